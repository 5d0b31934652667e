// q4_K (or, with an argument q6_K, q6_K) row dot products as the gate predictor runs them (8,960 rows of 1536
// per layer, 28 layers: a store larger than L3), ggml's vec_dot against the faster ones (kquant_dots.cpp), one
// thread; and the same rows of one layer again and again (in L3/L2: the arithmetic alone). For q4_K also ggml's
// GEMV over the rows interleaved eight at a time (the layout ggml's CPU backend repacks ffn_gate into for stock
// llama.cpp: block_q4_Kx8, ggml-cpu/repack.h), with the largest difference of its results from the rows'.
// build (from build/cpp): g++ -O2 -std=c++17 ../../scripts/prof/row_dots.cpp -I ../../cpp/include \
//   -I $LLAMA/include -I $LLAMA/ggml/include libneuralink_core.a -L$LIB -lggml-base -lggml-cpu -lggml -Wl,-rpath,$LIB -lpthread
#include "neuralink/kquant_dots.h"
#include "neuralink/weight_types.h"
#include "ggml.h"
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>
using namespace neuralink;
#include <cstring>
#include <cmath>

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

int main(int argc, char ** argv) {
    const int64_t n = 1536; const int nf = 8960, layers = 28;
    const ggml_type t = argc > 1 && std::strcmp(argv[1], "q6_K") == 0 ? GGML_TYPE_Q6_K : GGML_TYPE_Q4_K;
    const size_t rb = ggml_row_size(t, n);
    std::mt19937 rng(1); std::normal_distribution<float> nd;
    std::vector<float> vals((size_t) n * 64);
    std::vector<uint8_t> store(rb * nf * layers);
    for (size_t r = 0; r < (size_t) nf * layers; r += 64) {
        for (auto & v : vals) v = nd(rng);
        ggml_quantize_chunk(t, vals.data(), store.data() + rb * r, 0, 64, n, nullptr);
    }
    const WeightType & wt = weight_type(t);
    std::vector<float> x(n); for (auto & v : x) v = nd(rng);
    std::vector<uint8_t> xq(wt.act_row_bytes(n));
    wt.act_from_float(x.data(), xq.data(), n);
    std::vector<float> out(nf);
    struct Kernel { const char * name; ggml_vec_dot_t f; };
    std::vector<Kernel> kernels = { { "ggml", ggml_get_type_traits_cpu(t)->vec_dot } };
    for (const FasterDot & f : faster_vec_dots(t)) kernels.push_back({ f.isa, f.dot });
    for (int pass = 0; pass < 2; ++pass) {
        for (const Kernel & k : kernels) {
            double best_store = 1e9, best_layer = 1e9;
            for (int rep = 0; rep < 5; ++rep) {
                auto t0 = std::chrono::steady_clock::now();
                for (int l = 0; l < layers; ++l)
                    for (int r = 0; r < nf; ++r) k.f((int) n, &out[r], 0, store.data() + rb * ((size_t) l * nf + r), 0, xq.data(), 0, 1);
                double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / layers * 1e6;
                if (dt < best_store) best_store = dt;
                t0 = std::chrono::steady_clock::now();
                for (int l = 0; l < layers; ++l)
                    for (int r = 0; r < nf / 8; ++r) k.f((int) n, &out[r], 0, store.data() + rb * r, 0, xq.data(), 0, 1);
                dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / layers * 1e6;
                if (dt < best_layer) best_layer = dt;
            }
            if (pass == 1)
                std::printf("%-12s %4.0f us per layer of %d rows from DRAM (%.1f GB/s); %4.0f us per %d rows in L2 (%.1f GB/s)\n",
                            k.name, best_store, nf, rb * nf / best_store / 1e3, best_layer, nf / 8, rb * (nf / 8) / best_layer / 1e3);
        }
    }
    if (t != GGML_TYPE_Q4_K) return 0;
    const int64_t nb = n / 256;
    std::vector<uint8_t> inter(store.size());
    for (size_t g = 0; g < (size_t) nf * layers / 8; ++g) {
        for (int64_t b = 0; b < nb; ++b) {
            const uint8_t * in[8];
            for (int i = 0; i < 8; ++i) in[i] = store.data() + rb * (g * 8 + i) + kQ4K * b;
            interleave8(in, inter.data() + rb * g * 8 + 8 * kQ4K * b);
        }
    }
    std::vector<float> rows_out(nf), gemv_out(nf);
    double best = 1e9;
    for (int rep = 0; rep < 10; ++rep) {
        auto t0 = std::chrono::steady_clock::now();
        for (int l = 0; l < layers; ++l)
            ggml_gemv_q4_K_8x8_q8_K((int) n, gemv_out.data(), 0, inter.data() + rb * (size_t) l * nf, xq.data(), 1, nf);
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / layers * 1e6);
    }
    const ggml_vec_dot_t dot = kernels.front().f; // ggml's; the faster ones give its results bit for bit
    const size_t last = rb * (size_t) (layers - 1) * nf;
    for (int r = 0; r < nf; ++r) dot((int) n, &rows_out[r], 0, store.data() + last + rb * r, 0, xq.data(), 0, 1);
    float diff = 0, mag = 0;
    for (int r = 0; r < nf; ++r) {
        diff = std::max(diff, std::fabs(rows_out[r] - gemv_out[r]));
        mag = std::max(mag, std::fabs(rows_out[r]));
    }
    std::printf("%-12s %4.0f us per layer of %d rows from DRAM (%.1f GB/s); largest difference %.3g of %.3g\n",
                "interleaved", best, nf, rb * nf / best / 1e3, diff, mag);
}
