// q4_K gate rows as the gate predictor multiplies them every token (8,960 rows of 1536 per layer, 28 layers: a
// store larger than L3), one thread: the engine's fastest row-at-a-time dot product against ggml's GEMV over
// rows interleaved eight at a time (the layout ggml's CPU backend repacks ffn_gate into for stock llama.cpp:
// block_q4_Kx8, ggml-cpu/repack.h). Prints time per layer, GB/s, and the largest difference of the results.
// build (from build/cpp): g++ -O2 -std=c++17 ../../scripts/prof/gemv_interleaved.cpp -I ../../cpp/include \
//   -I $LLAMA/include -I $LLAMA/ggml/include libneuralink_core.a -L$LIB -lggml-base -lggml-cpu -lggml \
//   -Wl,-rpath,$LIB -lpthread
#include "neuralink/kquant_dots.h"
#include "neuralink/weight_types.h"
#include "ggml.h"
#include "ggml-cpu.h"
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>
using namespace neuralink;

extern "C" void ggml_gemv_q4_K_8x8_q8_K(int n, float * s, size_t bs, const void * vx, const void * vy, int nr, int nc);

constexpr size_t kQ4K = 144; // d, dmin (f16), scales[12], qs[128]

// eight q4_K blocks (the same block column of eight consecutive rows) into one interleaved block of 1152 bytes:
// d[8], dmin[8], scales[96] (sub-block k of all eight rows: six-bit scales and mins regrouped), qs[1024] (eight
// bytes of each row in turn)
static void interleave8(const uint8_t * const in[8], uint8_t * out) {
    for (int i = 0; i < 8; ++i) std::memcpy(out + 2 * i, in[i], 2);
    for (int i = 0; i < 8; ++i) std::memcpy(out + 16 + 2 * i, in[i] + 2, 2);
    uint8_t * sc = out + 32;
    uint8_t * qs = out + 128;
    for (int i = 0; i < 128; ++i) std::memcpy(qs + 8 * i, in[i % 8] + 16 + (i / 8) * 8, 8);
    auto put = [&](int at, const uint8_t s[8], const uint8_t m[8]) {
        for (int j = 0; j < 4; ++j) sc[at + j] = (uint8_t) ((s[j] & 63) + ((s[j + 4] & 48) << 2));
        for (int j = 0; j < 4; ++j) sc[at + 4 + j] = (uint8_t) ((m[j] & 63) + ((m[j + 4] & 48) << 2));
        for (int j = 0; j < 4; ++j) sc[at + 8 + j] = (uint8_t) ((s[j + 4] & 15) + ((m[j + 4] & 15) << 4));
    };
    uint8_t s[8], m[8];
    for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 8; ++j) {
            const uint8_t * q = in[j] + 4;
            s[j] = q[i] & 63;
            m[j] = q[i + 4] & 63;
        }
        put(i * 12, s, m);
    }
    for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 8; ++j) {
            const uint8_t * q = in[j] + 4;
            s[j] = (uint8_t) (((q[i] & 192) >> 2) | (q[i + 8] & 15));
            m[j] = (uint8_t) (((q[i + 4] & 192) >> 2) | ((q[i + 8] & 240) >> 4));
        }
        put(48 + i * 12, s, m);
    }
}

int main() {
    const int64_t n = 1536, nb = n / 256;
    const int nf = 8960, layers = 28;
    const ggml_type t = GGML_TYPE_Q4_K;
    const size_t rb = ggml_row_size(t, n);
    std::mt19937 rng(1);
    std::normal_distribution<float> nd;
    std::vector<float> vals((size_t) n * 64);
    std::vector<uint8_t> store(rb * nf * layers), inter(store.size());
    for (size_t r = 0; r < (size_t) nf * layers; r += 64) {
        for (auto & v : vals) v = nd(rng);
        ggml_quantize_chunk(t, vals.data(), store.data() + rb * r, 0, 64, n, nullptr);
    }
    for (size_t g = 0; g < (size_t) nf * layers / 8; ++g) {
        for (int64_t b = 0; b < nb; ++b) {
            const uint8_t * in[8];
            for (int i = 0; i < 8; ++i) in[i] = store.data() + rb * (g * 8 + i) + kQ4K * b;
            interleave8(in, inter.data() + rb * g * 8 + 8 * kQ4K * b);
        }
    }
    const WeightType & wt = weight_type(t);
    std::vector<float> x(n);
    for (auto & v : x) v = nd(rng);
    std::vector<uint8_t> xq(wt.act_row_bytes(n));
    wt.act_from_float(x.data(), xq.data(), n);
    std::vector<float> a(nf), b(nf);
    const FasterDot dot = faster_vec_dots(t).front();
    for (int pass = 0; pass < 2; ++pass) {
        double best_rows = 1e9, best_gemv = 1e9;
        for (int rep = 0; rep < 5; ++rep) {
            auto t0 = std::chrono::steady_clock::now();
            for (int l = 0; l < layers; ++l)
                for (int r = 0; r < nf; ++r) dot.dot((int) n, &a[r], 0, store.data() + rb * ((size_t) l * nf + r), 0, xq.data(), 0, 1);
            best_rows = std::min(best_rows, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / layers * 1e6);
            t0 = std::chrono::steady_clock::now();
            for (int l = 0; l < layers; ++l)
                ggml_gemv_q4_K_8x8_q8_K((int) n, b.data(), 0, inter.data() + rb * (size_t) l * nf, xq.data(), 1, nf);
            best_gemv = std::min(best_gemv, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / layers * 1e6);
        }
        if (pass == 1) {
            float diff = 0, mag = 0;
            for (int r = 0; r < nf; ++r) {
                diff = std::max(diff, std::fabs(a[r] - b[r]));
                mag = std::max(mag, std::fabs(a[r]));
            }
            std::printf("rows (%s) %5.0f us per layer (%.1f GB/s); interleaved GEMV %5.0f us (%.1f GB/s); "
                        "largest difference %.3g of %.3g (last layer)\n",
                        dot.isa, best_rows, rb * nf / best_rows / 1e3, best_gemv, rb * nf / best_gemv / 1e3, diff, mag);
        }
    }
}
