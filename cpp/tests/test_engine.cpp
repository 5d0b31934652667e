// Checks of the engine core against straightforward float references.

#include "test_util.h"

#include "neuralink/column_axpy.h"
#include "neuralink/direct_file.h"
#include "neuralink/engine.h"
#include "neuralink/ffn_layer.h"
#include "neuralink/kquant_dots.h"
#include "neuralink/gguf_model.h"
#include "neuralink/row_gemm.h"
#include "neuralink/silu.h"
#include "neuralink/weight_types.h"

#include "gguf.h"

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>

using namespace neuralink;

namespace {

std::vector<float> random_floats(size_t n, uint32_t seed, float scale = 1.0f) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> dist(0.0f, scale);
    std::vector<float> v(n);
    for (auto & x : v) {
        x = dist(rng);
    }
    return v;
}

// rows x cols floats quantized into `type` with ggml's own quantizer
std::vector<uint8_t> quantize(ggml_type type, const std::vector<float> & w, int64_t rows, int64_t cols) {
    std::vector<uint8_t> q(ggml_row_size(type, cols) * rows);
    ggml_quantize_chunk(type, w.data(), q.data(), 0, rows, cols, nullptr);
    return q;
}

std::vector<float> dequantize(ggml_type type, const uint8_t * q, int64_t rows, int64_t cols) {
    std::vector<float> w((size_t) (rows * cols));
    for (int64_t r = 0; r < rows; ++r) {
        weight_type(type).to_float(q + r * ggml_row_size(type, cols), w.data() + r * cols, cols);
    }
    return w;
}

struct OwnedMatrix {
    std::vector<uint8_t> bytes;
    WeightMatrix m;
};

OwnedMatrix make_matrix(ggml_type type, int64_t rows, int64_t cols, uint32_t seed) {
    OwnedMatrix o;
    o.bytes = quantize(type, random_floats((size_t) (rows * cols), seed, 0.5f), rows, cols);
    o.m.wt = &weight_type(type);
    o.m.rows = rows;
    o.m.cols = cols;
    o.m.row_bytes = ggml_row_size(type, cols);
    o.m.data = o.bytes.data();
    return o;
}

// y = down act(gate x + bg) * (up x + bu) + bd in double precision from dequantized weights
std::vector<float> reference_ffn(const FfnLayer & L, const std::vector<float> & x, int64_t n_tokens) {
    const auto up = dequantize(L.up.wt->type, L.up.data, L.n_ff, L.n_embd);
    const auto down = dequantize(L.down.wt->type, L.down.data, L.n_out, L.n_ff);
    const auto gate = L.gated ? dequantize(L.gate.wt->type, L.gate.data, L.n_ff, L.n_embd) : std::vector<float>();
    std::vector<float> y((size_t) (n_tokens * L.n_out));
    std::vector<double> h((size_t) L.n_ff);
    for (int64_t t = 0; t < n_tokens; ++t) {
        const float * xt = x.data() + t * L.n_embd;
        for (int64_t r = 0; r < L.n_ff; ++r) {
            double u = 0, g = 0;
            for (int64_t i = 0; i < L.n_embd; ++i) {
                u += (double) up[r * L.n_embd + i] * xt[i];
                if (L.gated) {
                    g += (double) gate[r * L.n_embd + i] * xt[i];
                }
            }
            if (!L.up_bias.empty()) u += L.up_bias[r];
            if (!L.gate_bias.empty()) g += L.gate_bias[r];
            h[r] = L.gated ? activate(L.act, (float) g) * u : activate(L.act, (float) u);
        }
        for (int64_t e = 0; e < L.n_out; ++e) {
            double v = L.down_bias.empty() ? 0.0 : L.down_bias[e];
            for (int64_t r = 0; r < L.n_ff; ++r) {
                v += (double) down[e * L.n_ff + r] * h[r];
            }
            y[t * L.n_out + e] = (float) v;
        }
    }
    return y;
}

void run_phases(const FfnLayer & L, FfnScratch & s, const float * x, float * y, int64_t n_tokens, int nth) {
    s.reserve(L, n_tokens);
    for (int phase = 0; phase < kDensePhases; ++phase) {
        for (int ith = 0; ith < nth; ++ith) {
            dense_ffn_phase(L, s, phase, x, y, n_tokens, ith, nth);
        }
    }
}

double max_abs(const std::vector<float> & v) {
    double m = 0;
    for (float x : v) m = std::max(m, (double) std::fabs(x));
    return m;
}

double max_abs_diff(const std::vector<float> & a, const std::vector<float> & b) {
    double m = 0;
    for (size_t i = 0; i < a.size(); ++i) m = std::max(m, (double) std::fabs(a[i] - b[i]));
    return m;
}

// a one- or two-layer GGUF of random weights, written with ggml's gguf writer
std::string write_tiny_gguf(const std::string & name, ggml_type type, int n_layer, int64_t n_embd, int64_t n_ff,
                            bool gated, bool biases) {
    ggml_init_params ip = { /*.mem_size =*/ 64u << 20, /*.mem_buffer =*/ nullptr, /*.no_alloc =*/ false };
    ggml_context * ctx = ggml_init(ip);
    gguf_context * g = gguf_init_empty();
    gguf_set_val_str(g, "general.architecture", "llama");
    gguf_set_val_u32(g, "llama.block_count", (uint32_t) n_layer);
    uint32_t seed = 1;
    auto add = [&](const std::string & tname, ggml_type t, int64_t ne0, int64_t ne1) {
        ggml_tensor * tensor = ne1 > 1 ? ggml_new_tensor_2d(ctx, t, ne0, ne1) : ggml_new_tensor_1d(ctx, t, ne0);
        ggml_set_name(tensor, tname.c_str());
        const auto w = random_floats((size_t) (ne0 * ne1), seed++, 0.5f);
        if (t == GGML_TYPE_F32) {
            std::memcpy(tensor->data, w.data(), w.size() * sizeof(float));
        } else {
            ggml_quantize_chunk(t, w.data(), tensor->data, 0, ne1, ne0, nullptr);
        }
        gguf_add_tensor(g, tensor);
    };
    for (int il = 0; il < n_layer; ++il) {
        const std::string p = "blk." + std::to_string(il) + ".";
        if (gated) add(p + "ffn_gate.weight", type, n_embd, n_ff);
        add(p + "ffn_up.weight", type, n_embd, n_ff);
        add(p + "ffn_down.weight", type, n_ff, n_embd);
        if (biases) {
            add(p + "ffn_up.bias", GGML_TYPE_F32, n_ff, 1);
            add(p + "ffn_down.bias", GGML_TYPE_F32, n_embd, 1);
        }
    }
    const std::string path = nltest::tmp_dir() + "/" + name;
    CHECK(gguf_write_to_file(g, path.c_str(), false));
    gguf_free(g);
    ggml_free(ctx);
    return path;
}

llama_ffn_hook_layer describe(const FfnLayer & L, int64_t n_tokens, std::vector<std::string> & names) {
    names = { L.up.name, L.gate.name, L.down.name };
    llama_ffn_hook_layer d {};
    d.il = L.il;
    d.act = (int32_t) L.act;
    d.gated = L.gated;
    d.n_embd = L.n_embd;
    d.n_ff = L.n_ff;
    d.n_out = L.n_out;
    d.n_tokens = n_tokens;
    d.up = names[0].c_str();
    d.gate = L.gated ? names[1].c_str() : nullptr;
    d.down = names[2].c_str();
    return d;
}

const ggml_type kWeightTypes[] = {
    GGML_TYPE_F32, GGML_TYPE_F16, GGML_TYPE_BF16, GGML_TYPE_Q4_0, GGML_TYPE_Q4_1, GGML_TYPE_Q5_0,
    GGML_TYPE_Q5_1, GGML_TYPE_Q8_0, GGML_TYPE_Q2_K, GGML_TYPE_Q3_K, GGML_TYPE_Q4_K, GGML_TYPE_Q5_K, GGML_TYPE_Q6_K,
};

} // namespace

TEST(vec_dot_of_every_weight_type_matches_dequantized_dot) {
    const int64_t n = 512;
    const auto a = random_floats(n, 7);
    for (ggml_type type : kWeightTypes) {
        const WeightType & wt = weight_type(type);
        const auto q = quantize(type, random_floats(n, 8), 1, n);
        const auto w = dequantize(type, q.data(), 1, n);
        std::vector<uint8_t> aq(wt.act_row_bytes(n));
        wt.act_from_float(a.data(), aq.data(), n);
        float got = 0;
        wt.vec_dot((int) n, &got, 0, q.data(), 0, aq.data(), 0, 1);
        double want = 0, scale = 0;
        for (int64_t i = 0; i < n; ++i) {
            want += (double) w[i] * a[i];
            scale += std::fabs((double) w[i] * a[i]);
        }
        // activations are rounded to vec_dot_type: 8-bit for quants, 16-bit for F16/BF16, exact for F32
        const double tol = wt.vec_dot_type == GGML_TYPE_F32 ? 1e-5 : wt.vec_dot_type == GGML_TYPE_F16 ? 2e-3 : 1.5e-2;
        CHECK_NEAR(got, want, tol * scale);
    }
}

// Raw blocks of random bytes (every scale, min, nibble and bit pattern; fp16 scales of either sign written at
// `halves`) against raw q8_K activations holding -128 .. 127 with their 16-value sums, rows of 1 to 6 blocks:
// every faster dot product for `type` this CPU runs gives ggml's vec_dot result bit for bit.
static void check_faster_dot_bit_for_bit(ggml_type type, size_t block_bytes, std::vector<size_t> halves) {
    const ggml_vec_dot_t ggml_dot = ggml_get_type_traits_cpu(type)->vec_dot;
    const WeightType & wt = weight_type(type);
    std::printf("    %s rows: %s\n", ggml_type_name(type), faster_vec_dot_isa(type));
    if (std::string(column_axpy_isa()) == "avx512" && ggml_cpu_has_avx2()) {
        CHECK(wt.vec_dot != ggml_dot); // the faster one is in use where it exists
    }
    std::mt19937 rng(5);
    std::uniform_int_distribution<int> byte(0, 255);
    std::normal_distribution<float> nd;
    constexpr size_t kQ8Block = 4 + 256 + 32;
    int compared = 0;
    for (int blocks = 1; blocks <= 6; ++blocks) {
        for (int trial = 0; trial < 50; ++trial) {
            std::vector<uint8_t> row(block_bytes * blocks), act(kQ8Block * blocks);
            for (auto & b : row) b = (uint8_t) byte(rng);
            for (int b = 0; b < blocks; ++b) {
                uint8_t * blk = row.data() + block_bytes * b;
                for (size_t at : halves) {
                    const ggml_fp16_t h = ggml_fp32_to_fp16(nd(rng) * 0.01f);
                    std::memcpy(blk + at, &h, 2);
                }
                uint8_t * a = act.data() + kQ8Block * b;
                const float ad = std::fabs(nd(rng)) * 0.05f;
                std::memcpy(a, &ad, 4);
                int8_t * qs = (int8_t *) (a + 4);
                for (int i = 0; i < 256; ++i) qs[i] = (int8_t) (trial == 0 ? (i % 2 ? 127 : -128) : byte(rng) - 128);
                for (int g = 0; g < 16; ++g) {
                    int16_t sum = 0;
                    for (int i = 0; i < 16; ++i) sum = (int16_t) (sum + qs[16 * g + i]);
                    std::memcpy(a + 4 + 256 + 2 * g, &sum, 2);
                }
            }
            float want = 0;
            ggml_dot(256 * blocks, &want, 0, row.data(), 0, act.data(), 0, 1);
            std::vector<ggml_vec_dot_t> dots = { wt.vec_dot };
            for (const FasterDot & f : faster_vec_dots(type)) dots.push_back(f.dot);
            for (ggml_vec_dot_t dot : dots) {
                float got = 0;
                dot(256 * blocks, &got, 0, row.data(), 0, act.data(), 0, 1);
                CHECK(std::memcmp(&want, &got, sizeof want) == 0);
            }
            ++compared;
        }
    }
    CHECK(compared == 300);
}

TEST(faster_q4_k_dot_gives_ggml_s_results_bit_for_bit) {
    check_faster_dot_bit_for_bit(GGML_TYPE_Q4_K, 144, { 0, 2 }); // d and dmin first
}

TEST(faster_q5_k_dot_gives_ggml_s_results_bit_for_bit) {
    check_faster_dot_bit_for_bit(GGML_TYPE_Q5_K, 176, { 0, 2 }); // d and dmin first
}

TEST(faster_q6_k_dot_gives_ggml_s_results_bit_for_bit) {
    check_faster_dot_bit_for_bit(GGML_TYPE_Q6_K, 210, { 208 }); // d last
}

TEST(column_axpy_of_every_weight_type_adds_the_scaled_dequantized_column) {
    const int64_t n = 512;
    auto column = random_floats(n, 11);
    column[3] = 1e-7f; // a block whose fp16 scale is subnormal
    for (int64_t i = 0; i < 32; ++i) column[32 + i] = 1e-6f * (float) (i - 16);
    const auto y0 = random_floats(n, 12);
    for (ggml_type type : kWeightTypes) {
        const WeightType & wt = weight_type(type);
        const auto q = quantize(type, column, 1, n);
        const auto w = dequantize(type, q.data(), 1, n);
        std::vector<float> y = y0, tmp(n);
        column_axpy(wt, q.data(), -0.75f, y.data(), n, tmp.data());
        for (int64_t i = 0; i < n; ++i) {
            CHECK_NEAR(y[i], y0[i] - 0.75 * w[i], 1e-6 * (1.0 + std::fabs(y0[i])));
        }
    }
}

TEST(k_quant_columns_add_exactly_what_their_decoded_values_add) {
    // the fused q6_K, q5_K and q4_K loops against decoding each column with ggml and adding the floats
    const int64_t n = 1536; // Qwen2.5-Coder-1.5B's n_embd: six blocks
    const int count = 5;
    for (ggml_type type : { GGML_TYPE_Q6_K, GGML_TYPE_Q5_K, GGML_TYPE_Q4_K }) {
        const WeightType & wt = weight_type(type);
        std::vector<std::vector<uint8_t>> storage;
        std::vector<const uint8_t *> columns;
        std::vector<float> h;
        for (int k = 0; k < count; ++k) {
            auto values = random_floats(n, 70 + k);
            values[5] = 40.0f * (float) (k + 1); // an outlier: the quantized values span their whole range
            values[700] = -25.0f * (float) (k + 1);
            storage.push_back(quantize(type, values, 1, n));
            h.push_back(0.3f * (float) (k - 2) + 0.01f);
        }
        for (const auto & c : storage) columns.push_back(c.data());
        std::vector<float> tmp(n), fused = random_floats(n, 80), reference = fused;
        columns_axpy(wt, columns.data(), h.data(), count, fused.data(), n, tmp.data());
        for (int k = 0; k < count; ++k) {
            const auto w = dequantize(type, columns[k], 1, n);
            float_axpy(w.data(), h[k], reference.data(), n);
        }
        CHECK(std::memcmp(fused.data(), reference.data(), n * sizeof(float)) == 0);
    }
}

TEST(columns_axpy_adds_columns_in_order_as_one_at_a_time_would) {
    const int64_t n = 256;
    const int count = 7; // a group of four and a remainder
    for (ggml_type type : { GGML_TYPE_Q8_0, GGML_TYPE_Q6_K, GGML_TYPE_Q5_K, GGML_TYPE_Q4_K }) {
        const WeightType & wt = weight_type(type);
        std::vector<std::vector<uint8_t>> storage;
        std::vector<const uint8_t *> columns;
        std::vector<float> h;
        for (int k = 0; k < count; ++k) {
            storage.push_back(quantize(type, random_floats(n, 20 + k), 1, n));
            h.push_back(0.25f * (float) (k - 3));
        }
        for (const auto & c : storage) columns.push_back(c.data());
        std::vector<float> tmp(n), together = random_floats(n, 30), one_by_one = together;
        columns_axpy(wt, columns.data(), h.data(), count, together.data(), n, tmp.data());
        for (int k = 0; k < count; ++k) column_axpy(wt, columns[k], h[k], one_by_one.data(), n, tmp.data());
        CHECK(std::memcmp(together.data(), one_by_one.data(), n * sizeof(float)) == 0);
    }
}

TEST(columns_axpy_batch_gives_each_token_the_sums_it_gets_alone) {
    // more columns than one decoded chunk, token counts across the six-token tiles, slices of y that end in
    // a partial register (q8_0 at 288, f16 at 100), h with zeros (whole columns of a tile too) and a stride of
    // its own
    struct Case { ggml_type type; int64_t n; };
    for (const Case c : { Case { GGML_TYPE_Q8_0, 288 }, Case { GGML_TYPE_Q6_K, 256 }, Case { GGML_TYPE_Q5_K, 256 }, Case { GGML_TYPE_Q4_K, 256 },
                          Case { GGML_TYPE_F16, 100 } }) {
        const WeightType & wt = weight_type(c.type);
        const int64_t n = c.n;
        const int count = kBatchColumns + 5;
        std::vector<std::vector<uint8_t>> storage;
        std::vector<const uint8_t *> columns;
        std::vector<uint32_t> index;
        for (int k = 0; k < count; ++k) {
            storage.push_back(quantize(c.type, random_floats(n, 40 + k), 1, n));
            index.push_back((uint32_t) (3 * k + 1)); // the neurons' columns of h, increasing, not contiguous
        }
        for (const auto & col : storage) columns.push_back(col.data());
        const int64_t h_stride = 3 * count + 7;
        for (int n_tok : { 2, 6, 7, 13 }) {
            std::vector<float> h((size_t) n_tok * h_stride);
            for (size_t i = 0; i < h.size(); ++i) h[i] = i % 5 == 2 ? 0.0f : 0.125f * (float) ((int) (i % 11) - 5);
            // columns no token of a six-token tile needs (left out of the tile), in every tile or in the first
            for (int k = 0; k < count; ++k) {
                for (int t = 0; t < n_tok; ++t) {
                    if (k % 7 == 3 || (k % 7 == 5 && t < 6)) h[(size_t) t * h_stride + index[k]] = 0.0f;
                }
            }
            const int64_t stride = n + 32;
            std::vector<float> tmp((size_t) kBatchColumns * n), batch = random_floats(stride * n_tok, 50 + n_tok),
                alone = batch;
            columns_axpy_batch(wt, columns.data(), index.data(), count, h.data(), h_stride, n_tok, batch.data(), stride,
                               n, tmp.data());
            for (int t = 0; t < n_tok; ++t) {
                std::vector<const uint8_t *> nonzero;
                std::vector<float> ht;
                for (int k = 0; k < count; ++k) {
                    const float hk = h[(size_t) t * h_stride + index[k]];
                    if (hk == 0.0f) continue;
                    nonzero.push_back(columns[k]);
                    ht.push_back(hk);
                }
                columns_axpy(wt, nonzero.data(), ht.data(), (int) ht.size(), alone.data() + t * stride, n, tmp.data());
            }
            CHECK(std::memcmp(batch.data(), alone.data(), batch.size() * sizeof(float)) == 0);
        }
    }
}

TEST(decoded_columns_are_ggml_s_values) {
    const int64_t n = 512;
    for (ggml_type type : { GGML_TYPE_Q8_0, GGML_TYPE_Q6_K, GGML_TYPE_Q5_K, GGML_TYPE_Q4_K }) {
        auto values = random_floats(n, 90);
        values[7] = 30.0f;
        const auto q = quantize(type, values, 1, n);
        const auto want = dequantize(type, q.data(), 1, n);
        std::vector<float> got(n);
        decode_column(weight_type(type), q.data(), got.data(), n);
        CHECK(std::memcmp(got.data(), want.data(), n * sizeof(float)) == 0);
    }
}

TEST(rows_times_tokens_matches_vec_dot_on_strided_rows) {
    const int64_t n_embd = 256, n_rows = 12, n_tokens = 9;
    for (ggml_type type : { GGML_TYPE_Q4_K, GGML_TYPE_Q8_0, GGML_TYPE_F32 }) {
        const WeightType & wt = weight_type(type);
        const size_t row = wt.row_bytes(n_embd), stride = row + 2 * ggml_type_size(type); // rows inside records
        const auto q = quantize(type, random_floats(n_rows * n_embd, 60), n_rows, n_embd);
        std::vector<uint8_t> records(stride * n_rows);
        for (int64_t r = 0; r < n_rows; ++r) std::memcpy(records.data() + r * stride, q.data() + r * row, row);
        const auto x = random_floats(n_tokens * n_embd, 61);
        const size_t act_row = wt.act_row_bytes(n_embd);
        std::vector<uint8_t> xq(act_row * n_tokens);
        for (int64_t t = 0; t < n_tokens; ++t) wt.act_from_float(x.data() + t * n_embd, xq.data() + t * act_row, n_embd);
        CHECK(gemm_stride_ok(wt, n_embd, stride));
        CHECK(!gemm_stride_ok(wt, n_embd, row - 1));
        const int64_t out_stride = n_rows + 3;
        std::vector<float> out(out_stride * n_tokens, -1.0f);
        std::vector<uint8_t> work;
        rows_times_tokens(wt, records.data(), stride, n_rows, n_embd, xq.data(), n_tokens, out.data(), out_stride, work);
        for (int64_t t = 0; t < n_tokens; ++t) {
            for (int64_t r = 0; r < n_rows; ++r) {
                float want;
                wt.vec_dot((int) n_embd, &want, 0, q.data() + r * row, 0, xq.data() + t * act_row, 0, 1);
                CHECK_NEAR(out[t * out_stride + r], want, 1e-4 * (1.0 + std::fabs(want)));
            }
            CHECK(out[t * out_stride + n_rows] == -1.0f); // nothing written between the rows of out
        }
    }
}

// the prediction activates a row at once and the per-pair code one value at a time: every value, at every
// position of a row (SIMD lanes and the scalar tail), gets the same float, within 3 ulp of SiLU in double
// (expf's SiLU is off by as much: the error is 1 + e's rounding and the division's)
TEST(silu_of_a_row_is_silu_of_each_value_and_close_to_expf) {
    std::mt19937 rng(7);
    std::uniform_real_distribution<float> wide(-120.0f, 120.0f), narrow(-12.0f, 12.0f);
    std::vector<float> in;
    for (int i = 0; i < 4000; ++i) in.push_back(i % 2 ? wide(rng) : narrow(rng));
    for (float v : { 0.0f, -0.0f, 1e-40f, -1e-40f, 87.0f, -87.0f, 88.0f, -88.0f, 89.0f, -89.0f, 1e30f, -1e30f,
                     INFINITY, -INFINITY }) {
        in.push_back(v);
    }
    for (size_t shift = 0; shift < 17; ++shift) { // every alignment of the SIMD lanes against the tail
        std::vector<float> out(in.size() - shift);
        silu_span(in.data() + shift, out.data(), (int64_t) out.size());
        for (size_t i = 0; i < out.size(); ++i) {
            const float x = in[i + shift];
            const float one = silu(x);
            CHECK(std::memcmp(&out[i], &one, sizeof one) == 0);
            CHECK(activate(Activation::Silu, x) == one || (std::isnan(one) && std::isnan(activate(Activation::Silu, x))));
            if (std::fabs(x) <= 80.0f) {
                const double ref = x / (1.0 + std::exp(-(double) x));
                const float near = (float) ref;
                CHECK(std::fabs(one - ref) <= 3.0 * std::fabs(std::nextafter(near, INFINITY) - near));
            }
        }
    }
    CHECK(silu(-200.0f) <= 0.0f && silu(-200.0f) > -1e-30f);
    CHECK(silu(200.0f) == 200.0f);
    float nan_out;
    const float nan_in = NAN;
    silu_span(&nan_in, &nan_out, 1);
    CHECK(std::isnan(nan_out));
}

TEST(activations_follow_ggml_definitions) {
    CHECK(activate(Activation::Relu, -2.0f) == 0.0f);
    CHECK(activate(Activation::Relu, 3.0f) == 3.0f);
    CHECK(activate(Activation::ReluSqr, -2.0f) == 0.0f);
    CHECK(activate(Activation::ReluSqr, 3.0f) == 9.0f);
    CHECK_NEAR(activate(Activation::Silu, 1.0f), 1.0 / (1.0 + std::exp(-1.0)), 1e-6);
    for (float v : { -3.0f, -0.5f, 0.0f, 0.7f, 2.5f }) {
        const double exact = 0.5 * v * (1.0 + std::tanh(0.7978845608 * v * (1.0 + 0.044715 * v * v)));
        CHECK_NEAR(activate(Activation::Gelu, v), exact, 2e-3 * std::max(1.0, std::fabs(exact)));
    }
    CHECK(activate(Activation::Gelu, -11.0f) == 0.0f);
    CHECK(activate(Activation::Gelu, 12.0f) == 12.0f);
    CHECK(activation_from_name("relu_sqr") == Activation::ReluSqr);
    CHECK_THROWS(std::invalid_argument, activation_from_name("tanh"), "unknown activation 'tanh'");
}

TEST(split_range_covers_everything_once_in_grains) {
    for (int64_t n : { 0, 1, 15, 16, 17, 1536, 14336 }) {
        for (int nth : { 1, 2, 3, 8 }) {
            int64_t next = 0;
            for (int ith = 0; ith < nth; ++ith) {
                const auto [b, e] = split_range(n, ith, nth, 16);
                CHECK(b == next);
                CHECK(e >= b);
                CHECK(b % 16 == 0 || b == n);
                next = e;
            }
            CHECK(next == n);
        }
    }
}

TEST(dense_ffn_matches_float_reference_for_every_weight_type) {
    const int64_t n_embd = 256, n_ff = 512, n_tokens = 5;
    for (ggml_type type : kWeightTypes) {
        for (Activation act : { Activation::Silu, Activation::Gelu, Activation::ReluSqr }) {
            const bool gated = act != Activation::ReluSqr;
            auto up = make_matrix(type, n_ff, n_embd, 1), gate = make_matrix(type, n_ff, n_embd, 2),
                 down = make_matrix(type, n_embd, n_ff, 3);
            FfnLayer L;
            L.il = 0;
            L.act = act;
            L.gated = gated;
            L.n_embd = n_embd;
            L.n_ff = n_ff;
            L.n_out = n_embd;
            L.up = up.m;
            L.down = down.m;
            if (gated) L.gate = gate.m;
            L.up_bias = random_floats(n_ff, 4, 0.1f);
            L.down_bias = random_floats(n_embd, 5, 0.1f);
            const auto x = random_floats(n_tokens * n_embd, 6);
            std::vector<float> y(n_tokens * n_embd);
            FfnScratch s;
            run_phases(L, s, x.data(), y.data(), n_tokens, 1);
            const auto want = reference_ffn(L, x, n_tokens);
            const double tol = weight_type(type).vec_dot_type == GGML_TYPE_F32 ? 1e-4 : 3e-2;
            if (max_abs_diff(y, want) > tol * max_abs(want)) {
                throw nltest::Failure(std::string("type ") + ggml_type_name(type) + ", " + activation_name(act) +
                        ": max diff " + std::to_string(max_abs_diff(y, want)) + " vs max " + std::to_string(max_abs(want)));
            }
        }
    }
}

TEST(dense_ffn_split_across_threads_is_bit_identical) {
    const int64_t n_embd = 256, n_ff = 768, n_tokens = 7;
    auto up = make_matrix(GGML_TYPE_Q4_1, n_ff, n_embd, 11), gate = make_matrix(GGML_TYPE_Q4_K, n_ff, n_embd, 12),
         down = make_matrix(GGML_TYPE_Q6_K, n_embd, n_ff, 13);
    FfnLayer L;
    L.il = 0;
    L.gated = true;
    L.n_embd = n_embd;
    L.n_ff = n_ff;
    L.n_out = n_embd;
    L.up = up.m;
    L.gate = gate.m;
    L.down = down.m;
    const auto x = random_floats(n_tokens * n_embd, 14);
    std::vector<float> y1(n_tokens * n_embd), y3(n_tokens * n_embd);
    FfnScratch s;
    run_phases(L, s, x.data(), y1.data(), n_tokens, 1);
    run_phases(L, s, x.data(), y3.data(), n_tokens, 3);
    CHECK(std::memcmp(y1.data(), y3.data(), y1.size() * sizeof(float)) == 0);
}

TEST(gguf_model_rejects_missing_foreign_and_truncated_files) {
    const std::string dir = nltest::tmp_dir();
    CHECK_THROWS(std::runtime_error, GgufModel(dir + "/absent.gguf"), "absent.gguf: cannot open");
    {
        std::ofstream(dir + "/text.gguf") << "this is not a model\n";
    }
    CHECK_THROWS(std::runtime_error, GgufModel(dir + "/text.gguf"), "text.gguf: not a valid GGUF file");

    const std::string path = write_tiny_gguf("trunc.gguf", GGML_TYPE_Q8_0, 1, 64, 128, true, false);
    const auto size = std::filesystem::file_size(path);
    std::filesystem::resize_file(path, size - 100);
    bool rejected = false;
    try {
        GgufModel m(path);
    } catch (const std::runtime_error & e) {
        rejected = std::string(e.what()).find("trunc.gguf") != std::string::npos;
    }
    CHECK(rejected);
}

TEST(direct_file_reads_ranges_and_reports_out_of_range) {
    const std::string path = nltest::tmp_dir() + "/bytes.bin";
    std::vector<uint8_t> data(3 * kDirectAlign + 123);
    for (size_t i = 0; i < data.size(); ++i) data[i] = (uint8_t) (i * 7 + 3);
    {
        std::ofstream f(path, std::ios::binary);
        f.write((const char *) data.data(), (std::streamsize) data.size());
    }
    DirectFile file(path, true);
    for (auto [off, len] : { std::pair<uint64_t, size_t>{ 0, 10 }, { 100, 5000 }, { 4096, 4096 }, { 8000, data.size() - 8000 } }) {
        const uint8_t * start = nullptr;
        AlignedBuffer buf = file.read_range(off, len, &start);
        CHECK(std::memcmp(start, data.data() + off, len) == 0);
    }
    const uint8_t * start = nullptr;
    CHECK_THROWS(std::runtime_error, file.read_range(data.size() - 10, 20, &start), "beyond the end of the file");
}

TEST(engine_takes_matching_layers_and_declines_others) {
    const std::string path = write_tiny_gguf("tiny.gguf", GGML_TYPE_Q8_0, 2, 64, 128, true, true);
    Engine engine(path, EngineOptions {});
    CHECK(engine.n_layer() == 2);
    CHECK(engine.layer_status()[1].loaded);

    std::vector<std::string> names;
    llama_ffn_hook_layer d = describe(engine.layer(1), 4, names);
    d.up_bias = "blk.1.ffn_up.bias";
    d.down_bias = "blk.1.ffn_down.bias";
    int32_t n_phases = 0;
    CHECK(engine.take(d, &n_phases) == 1);
    CHECK(n_phases == kDensePhases);
    CHECK(engine.layer_status()[1].taken);

    // a shared-expert FFN of the same layer uses other tensors: not ours
    llama_ffn_hook_layer other = d;
    other.up = "blk.1.ffn_up_shexp.weight";
    CHECK(engine.take(other, &n_phases) < 0);
    CHECK(engine.layer_status()[1].reason.find("other than the layer's own") != std::string::npos);

    llama_ffn_hook_layer no_bias = d;
    no_bias.down_bias = nullptr;
    CHECK(engine.take(no_bias, &n_phases) < 0);
}

TEST(engine_forward_matches_reference_and_hook_path) {
    const int64_t n_embd = 64, n_ff = 128, n_tokens = 3;
    const std::string path = write_tiny_gguf("tiny2.gguf", GGML_TYPE_F32, 1, n_embd, n_ff, true, true);
    Engine engine(path, EngineOptions {});
    const auto x = random_floats(n_tokens * n_embd, 21);
    std::vector<float> y(n_tokens * n_embd), y_hook(n_tokens * n_embd);
    engine.forward(0, Activation::Silu, x.data(), y.data(), n_tokens);
    const auto want = reference_ffn(engine.layer(0), x, n_tokens);
    CHECK(max_abs_diff(y, want) <= 1e-4 * max_abs(want));

    // through the C hook, two threads, as llama.cpp would run it
    std::vector<std::string> names;
    llama_ffn_hook_layer d = describe(engine.layer(0), n_tokens, names);
    d.up_bias = "blk.0.ffn_up.bias";
    d.down_bias = "blk.0.ffn_down.bias";
    const llama_ffn_hook * hook = engine.hook();
    int32_t n_phases = 0;
    const int32_t handle = hook->take(hook->user_data, &d, &n_phases);
    CHECK(handle == 0);
    for (int phase = 0; phase < n_phases; ++phase) {
        for (int ith = 0; ith < 2; ++ith) {
            hook->compute(hook->user_data, handle, phase, x.data(), y_hook.data(), n_tokens, ith, 2);
        }
    }
    CHECK(std::memcmp(y.data(), y_hook.data(), y.size() * sizeof(float)) == 0);
    CHECK(engine.tokens_computed() == (uint64_t) n_tokens);
}
