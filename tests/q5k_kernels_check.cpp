// The x86 q5_K GEMV/GEMM of patches/0003-q5k-repack-x86.patch against ggml's portable versions of the same
// functions, which define what the interleaved layout means, on random blocks; and the GEMM against the GEMV on
// the same activations. Built and run by tests/test_q5k_repack.py against the installed libggml-cpu.
//
//   q5k_kernels_check            prints "gemm <err> gemv <err> gemm-vs-gemv <err>" (largest relative errors)
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

extern "C" {
void ggml_cpu_init(void);
void ggml_gemm_q5_K_8x8_q8_K(int, float *, size_t, const void *, const void *, int, int);
void ggml_gemm_q5_K_8x8_q8_K_generic(int, float *, size_t, const void *, const void *, int, int);
void ggml_gemv_q5_K_8x8_q8_K(int, float *, size_t, const void *, const void *, int, int);
void ggml_gemv_q5_K_8x8_q8_K_generic(int, float *, size_t, const void *, const void *, int, int);
void ggml_quantize_mat_q8_K_4x8(const float *, void *, int64_t);
void quantize_row_q8_K(const float *, void *, int64_t);
}

// ggml's block_q5_Kx8, block_q8_K and block_q8_Kx4 (repack.h, ggml-common.h)
struct BlockQ5Kx8 { uint16_t d[8], dmin[8]; uint8_t scales[96], qh[256], qs[1024]; };
struct BlockQ8K { float d; int8_t qs[256]; int16_t bsums[16]; };
struct BlockQ8Kx4 { float d[4]; int8_t qs[1024]; int16_t bsums[64]; };

static uint16_t half_of(float f) {  // positive normal values only
    uint32_t x;
    memcpy(&x, &f, 4);
    return (uint16_t) (((((x >> 23) & 0xff) - 127 + 15) << 10) | ((x >> 13) & 0x3ff));
}

static double relative(float a, float b) { return std::fabs(a - b) / (std::fabs(b) + 1.0); }

int main() {
    ggml_cpu_init();
    std::mt19937 rng(7);
    // 5 groups of eight weight rows: two pairs (the VNNI path) and one group alone (the AVX2 path)
    const int n = 1024, nc = 40, nb = n / 256;
    std::vector<BlockQ5Kx8> w((nc / 8) * nb);
    std::uniform_real_distribution<float> scale(0.001f, 0.011f);
    for (BlockQ5Kx8 & b : w) {
        for (size_t i = 0; i < sizeof b; i++) {
            ((uint8_t *) &b)[i] = (uint8_t) rng();
        }
        for (int j = 0; j < 8; j++) {
            b.d[j] = half_of(scale(rng));
            b.dmin[j] = half_of(scale(rng));
        }
    }
    std::normal_distribution<float> normal;
    double gemm_err = 0, gemv_err = 0, cross_err = 0;
    for (int nr : {4, 8, 12}) {
        std::vector<float> x((size_t) nr * n);
        for (float & v : x) {
            v = normal(rng);
        }
        std::vector<BlockQ8Kx4> a4((nr / 4) * nb);
        for (int y = 0; y < nr / 4; y++) {
            ggml_quantize_mat_q8_K_4x8(x.data() + (size_t) y * 4 * n, a4.data() + y * nb, n);
        }
        std::vector<float> fast((size_t) nr * nc), portable((size_t) nr * nc);
        ggml_gemm_q5_K_8x8_q8_K(n, fast.data(), nc, w.data(), a4.data(), nr, nc);
        ggml_gemm_q5_K_8x8_q8_K_generic(n, portable.data(), nc, w.data(), a4.data(), nr, nc);
        for (size_t i = 0; i < fast.size(); i++) {
            gemm_err = std::max(gemm_err, relative(fast[i], portable[i]));
        }
        std::vector<BlockQ8K> a1(nb);
        std::vector<float> row(nc), row_portable(nc);
        for (int r = 0; r < nr; r++) {
            quantize_row_q8_K(x.data() + (size_t) r * n, a1.data(), n);
            ggml_gemv_q5_K_8x8_q8_K(n, row.data(), nc, w.data(), a1.data(), 1, nc);
            ggml_gemv_q5_K_8x8_q8_K_generic(n, row_portable.data(), nc, w.data(), a1.data(), 1, nc);
            for (int j = 0; j < nc; j++) {
                gemv_err = std::max(gemv_err, relative(row[j], row_portable[j]));
                cross_err = std::max(cross_err, relative(fast[(size_t) r * nc + j], row[j]));
            }
        }
    }
    printf("gemm %.3e gemv %.3e gemm-vs-gemv %.3e\n", gemm_err, gemv_err, cross_err);
    return 0;
}
