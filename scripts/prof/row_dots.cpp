// q4_K (or, with an argument q6_K, q6_K) row dot products as the gate predictor runs them (8,960 rows of 1536
// per layer, 28 layers: a store larger than L3), ggml's vec_dot against the faster ones (kquant_dots.cpp), one
// thread; and the same rows of one layer again and again (in L3/L2: the arithmetic alone)
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
}
