// columns_axpy per column type: 3,500 of 8,960 columns of 1536 per layer, 28 layers (a store larger than L3)
// build (from build/cpp, after scripts/setup.sh test): g++ -O2 -std=c++17 ../../scripts/prof/column_loops.cpp -I ../../cpp/include \
//   -I $LLAMA/include -I $LLAMA/ggml/include libneuralink_core.a -L$LIB -lggml-base -lggml-cpu -lggml -Wl,-rpath,$LIB -lpthread
// ($LLAMA, $LIB: NEURALINK_LLAMA_SRC and NEURALINK_LLAMA_LIB_DIR in CMakeCache.txt); NEURALINK_KERNELS=avx2 for the AVX2 loops
#include "neuralink/column_axpy.h"
#include "neuralink/weight_types.h"
#include "ggml.h"
#include <chrono>
#include <cstdio>
#include <random>
#include <vector>
using namespace neuralink;
int main() {
    const int64_t n = 1536; const int nf = 8960, use = 3500;
    std::mt19937 rng(1); std::normal_distribution<float> nd;
    std::vector<float> vals((size_t) n);
    for (ggml_type t : {GGML_TYPE_Q8_0, GGML_TYPE_Q6_K, GGML_TYPE_Q5_K, GGML_TYPE_Q4_K}) {
        const size_t rb = ggml_row_size(t, n);
        std::vector<uint8_t> store(rb * nf * 28);
        for (int c = 0; c < nf * 28; c += 1) { for (auto & v : vals) v = nd(rng); ggml_quantize_chunk(t, vals.data(), store.data() + rb * c, 0, 1, n, nullptr); }
        const WeightType & wt = weight_type(t);
        std::vector<float> y(n), tmp(n), h(use, 0.5f);
        double best = 1e9;
        for (int rep = 0; rep < 5; ++rep) {
            auto t0 = std::chrono::steady_clock::now();
            for (int layer = 0; layer < 28; ++layer) {
                std::vector<const uint8_t *> cols;
                for (int k = 0; k < use; ++k) cols.push_back(store.data() + rb * ((size_t) layer * nf + (k * 5 % nf)));
                columns_axpy(wt, cols.data(), h.data(), use, y.data(), n, tmp.data());
            }
            double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 28 * 1e6;
            if (dt < best) best = dt;
        }
        std::printf("%s: %zu B/column, %.0f us per layer of %d columns (%s)\n", ggml_type_name(t), rb, best, use, column_axpy_isa());
    }
}
