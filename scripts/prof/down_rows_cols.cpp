// The down projection of one decoded token, 28 layers, 2 threads: q5_K columns of 39 % of 8,960 neurons chosen at
// random (each thread its half of every column, as the engine) against every row of 8,960 in q4_K, q5_K, q6_K or q8_0 with h
// converted to their vec_dot type (q8_K, q8_0) (as llama.cpp, and the engine's down rows). Random choices scatter the columns more than a
// placement does: the engine measured the columns cheaper than this (docs/benchmarks.md, fourteenth pass).
// HOT=1: the columns of one layer for every layer (3.7 MiB, held in L3), to tell the loop's arithmetic from its
// memory traffic.
// build (from build/cpp, after scripts/setup.sh test): g++ -O2 -std=c++17 ../../scripts/prof/down_rows_cols.cpp -I ../../cpp/include \
//   -I $LLAMA/include -I $LLAMA/ggml/include libneuralink_core.a -L$LIB -lggml-base -lggml-cpu -lggml -Wl,-rpath,$LIB -lpthread
// ($LLAMA: NEURALINK_LLAMA_SRC in CMakeCache.txt; $LIB: the venv's llama_cpp/lib)
#include "neuralink/column_axpy.h"
#include "neuralink/weight_types.h"
#include "ggml.h"
#include "ggml-cpu.h"
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <thread>
#include <vector>
using namespace neuralink;
struct Barrier { std::atomic<int> count{0}, gen{0}; int n; void wait() { int g = gen.load(); if (count.fetch_add(1) + 1 == n) { count = 0; gen.fetch_add(1); } else while (gen.load() == g) {} } };
int main() {
    const bool hot = std::getenv("HOT") != nullptr;
    const int64_t n = 1536; const int nf = 8960, L = 28; const double dens = 0.39;
    std::mt19937 rng(1); std::normal_distribution<float> nd; std::uniform_real_distribution<float> ud;
    std::vector<float> vals(nf);
    const size_t cb = ggml_row_size(GGML_TYPE_Q5_K, n);
    std::vector<uint8_t> cols(cb * nf * L);
    for (int c = 0; c < nf * L; ++c) { for (int i = 0; i < n; ++i) vals[i] = nd(rng); ggml_quantize_chunk(GGML_TYPE_Q5_K, vals.data(), cols.data() + cb * c, 0, 1, n, nullptr); }
    std::vector<ggml_type> rt = { GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K, GGML_TYPE_Q8_0 };
    std::vector<std::vector<uint8_t>> rows(rt.size());
    for (size_t r = 0; r < rt.size(); ++r) {
        const size_t rb = ggml_row_size(rt[r], nf);
        rows[r].resize(rb * n * L);
        for (int64_t j = 0; j < n * L; ++j) { for (auto & v : vals) v = nd(rng); ggml_quantize_chunk(rt[r], vals.data(), rows[r].data() + rb * j, 0, 1, nf, nullptr); }
    }
    std::vector<uint8_t> junk(64 << 20, 1);
    const int tokens = 30;
    std::vector<std::vector<float>> h(L, std::vector<float>(nf));
    for (auto & l : h) for (auto & v : l) v = ud(rng) < dens ? nd(rng) : 0.0f;
    for (int mode = 0; mode <= (int) rt.size(); ++mode) for (int rep = 0; rep < 3; ++rep) {
        std::vector<float> y(n);
        Barrier bar; bar.n = 2;
        double ns[2] = {0, 0};
        auto work = [&](int ith) {
            std::vector<float> tmp(n);
            std::vector<const uint8_t *> cp; std::vector<float> hh;
            const ggml_type t = mode ? rt[mode - 1] : GGML_TYPE_Q5_K;
            const WeightType & wt = weight_type(t);
            std::vector<uint8_t> hq(wt.act_row_bytes(nf));
            volatile uint64_t sink = 0;
            for (int tk = 0; tk < tokens; ++tk) for (int l = 0; l < L; ++l) {
                uint64_t s = 0; size_t off = ((size_t) (tk * L + l) * (4 << 20) + ith * (2 << 20)) % (junk.size() - (2 << 20));
                for (size_t i = 0; i < (2u << 20); i += 64) s += junk[off + i];
                sink += s;
                bar.wait();
                auto t0 = std::chrono::steady_clock::now();
                if (mode == 0) {
                    cp.clear(); hh.clear();
                    const uint8_t * base = cols.data() + cb * (size_t) (hot ? 0 : l) * nf;
                    for (int p = 0; p < nf; ++p) if (h[l][p] != 0.0f) { cp.push_back(base + cb * p + ith * (cb / 2)); hh.push_back(h[l][p]); }
                    columns_axpy(wt, cp.data(), hh.data(), (int) cp.size(), y.data() + ith * n / 2, n / 2, tmp.data());
                } else {
                    wt.act_from_float(h[l].data(), hq.data(), nf);  // each thread converts (stand-in for a shared phase)
                    const size_t rb = ggml_row_size(t, nf);
                    const uint8_t * base = rows[mode - 1].data() + rb * (size_t) l * n;
                    for (int64_t j = ith * n / 2; j < (ith + 1) * n / 2; ++j) wt.vec_dot((int) nf, &y[j], 0, base + rb * j, 0, hq.data(), 0, 1);
                }
                bar.wait();
                ns[ith] += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
            }
        };
        std::thread t1(work, 1); work(0); t1.join();
        const char * names[] = { hot ? "q5_K columns, 39 %, one layer's (hot)" : "q5_K columns, 39 %", "q4_K rows, all", "q5_K rows, all", "q6_K rows, all", "q8_0 rows, all" };
        std::printf("%s: %.2f ms per token\n", names[mode], ns[0] / tokens * 1e3);
    }
}
