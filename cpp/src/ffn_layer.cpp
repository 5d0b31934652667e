#include "neuralink/ffn_layer.h"

#include "neuralink/names.h"
#include "neuralink/silu.h"

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <mutex>
#include <stdexcept>

// ggml-cpu's own SiLU kernels: exported by libggml-cpu but declared only in its
// internal vec.h. Their SIMD exp differs from expf by an ulp, and on models with
// massive activations an ulp can flip the scale of a quantized block, so
// matching llama.cpp bit for bit needs the very same kernels.
extern "C" {
void ggml_vec_swiglu_f32(const int n, float * y, const float * x, const float * g);
void ggml_vec_silu_f32(const int n, float * y, const float * x);
}

namespace neuralink {

static constexpr Named<Activation> kActivationNames[] = {
    { Activation::Silu, "silu" }, { Activation::Gelu, "gelu" }, { Activation::Relu, "relu" },
    { Activation::ReluSqr, "relu_sqr" },
};

const char * activation_name(Activation act) { return name_in(kActivationNames, act); }
Activation activation_from_name(const std::string & name) { return value_in(kActivationNames, name, "activation"); }

// ggml evaluates GELU on f32 through a table indexed by the fp16 input (GGML_GELU_FP16)
static const std::array<ggml_fp16_t, 1 << 16> & gelu_table() {
    static std::array<ggml_fp16_t, 1 << 16> table;
    static std::once_flag once;
    std::call_once(once, [] {
        const float sqrt_2_over_pi = 0.79788456080286535587989211986876f;
        const float coef_a = 0.044715f;
        for (uint32_t i = 0; i < table.size(); ++i) {
            ggml_fp16_t h;
            const uint16_t bits = (uint16_t) i;
            static_assert(sizeof(h) == sizeof(bits), "fp16 is 16 bits");
            std::memcpy(&h, &bits, sizeof(h));
            const float f = ggml_fp16_to_fp32(h);
            table[i] = ggml_fp32_to_fp16(0.5f * f * (1.0f + tanhf(sqrt_2_over_pi * f * (1.0f + coef_a * f * f))));
        }
    });
    return table;
}

static inline float gelu_f32(float v) {
    if (v <= -10.0f) {
        return 0.0f;
    }
    if (v >= 10.0f) {
        return v;
    }
    const ggml_fp16_t h = ggml_fp32_to_fp16(v);
    uint16_t bits;
    std::memcpy(&bits, &h, sizeof(bits));
    return ggml_fp16_to_fp32(gelu_table()[bits]);
}

float activate(Activation act, float v) {
    switch (act) {
        case Activation::Silu:    return silu(v);
        case Activation::Gelu:    return gelu_f32(v);
        case Activation::Relu:    return v > 0.0f ? v : 0.0f;
        case Activation::ReluSqr: { const float r = v > 0.0f ? v : 0.0f; return r * r; }
    }
    return v;
}

void activate_span(Activation act, const float * in, float * out, int64_t n) {
    if (act == Activation::Silu) {
        silu_span(in, out, n);
        return;
    }
    for (int64_t i = 0; i < n; ++i) out[i] = activate(act, in[i]);
}

void activate_rows(Activation act, bool gated, int n, float * out, const float * g, const float * u) {
    if (act == Activation::Silu) {
        if (gated) {
            ggml_vec_swiglu_f32(n, out, g, u);
        } else {
            ggml_vec_silu_f32(n, out, u);
        }
        return;
    }
    for (int i = 0; i < n; ++i) {
        out[i] = gated ? activate(act, g[i]) * u[i] : activate(act, u[i]);
    }
}

std::pair<int64_t, int64_t> split_range(int64_t n, int ith, int nth, int64_t grain) {
    const int64_t units = (n + grain - 1) / grain;
    const int64_t per = units / nth, extra = units % nth;
    const int64_t ub = ith * per + std::min<int64_t>(ith, extra);
    const int64_t ue = ub + per + (ith < extra ? 1 : 0);
    return { std::min(n, ub * grain), std::min(n, ue * grain) };
}

void FfnScratch::reserve(const FfnLayer & L, int64_t n_tokens) {
    auto round64 = [](size_t v) { return (v + 63) / 64 * 64; };
    const size_t need_xq = round64(std::max(L.up.wt->act_row_bytes(L.n_embd),
                                            L.gated ? L.gate.wt->act_row_bytes(L.n_embd) : 0));
    const size_t need_h  = round64(sizeof(float) * (size_t) L.n_ff);
    const size_t need_hq = round64(L.down.wt->act_row_bytes(L.n_ff));
    if (n_tokens <= capacity_ && need_xq <= xq_bytes_ && need_h <= h_bytes_ && need_hq <= hq_bytes_) {
        return;
    }
    capacity_ = std::max(capacity_, n_tokens);
    xq_bytes_ = std::max(xq_bytes_, need_xq);
    h_bytes_  = std::max(h_bytes_, need_h);
    hq_bytes_ = std::max(hq_bytes_, need_hq);
    const size_t cap = (size_t) capacity_;
    mem_.assign((2 * xq_bytes_ + h_bytes_ + hq_bytes_) * cap + 64, 0);
    uint8_t * base = mem_.data() + (64 - (uintptr_t) mem_.data() % 64) % 64;
    xq_gate = base;
    xq_up   = xq_gate + xq_bytes_ * cap;
    h       = (float *) (xq_up + xq_bytes_ * cap);
    hq      = (uint8_t *) h + h_bytes_ * cap;
}

// converts n_rows rows of n_cols floats into `dst_type` rows, the blocks split across threads
static void convert_rows(ggml_from_float_t from_float, ggml_type dst_type, const float * src, size_t src_stride,
                         uint8_t * dst, size_t dst_stride, int64_t n_rows, int64_t n_cols, int ith, int nth) {
    const int64_t bs = ggml_blck_size(dst_type);
    const size_t bb = ggml_type_size(dst_type);
    const int64_t blocks_per_row = n_cols / bs;
    const auto [b0, b1] = split_range(n_rows * blocks_per_row, ith, nth);
    for (int64_t b = b0; b < b1;) {
        const int64_t r = b / blocks_per_row;
        const int64_t first = b % blocks_per_row;
        const int64_t last = std::min(blocks_per_row, first + (b1 - b));
        from_float(src + r * src_stride + first * bs, dst + r * dst_stride + first * bb, (last - first) * bs);
        b += last - first;
    }
}

void dense_ffn_phase(const FfnLayer & L, FfnScratch & s, int phase,
                     const float * x, float * y, int64_t n_tokens, int ith, int nth) {
    const WeightType & upt = *L.up.wt;
    const WeightType & dnt = *L.down.wt;
    const size_t xq_up_row = upt.act_row_bytes(L.n_embd);
    const size_t xq_gate_row = L.gated ? L.gate.wt->act_row_bytes(L.n_embd) : 0;
    const bool share_xq = !L.gated || L.gate.wt->vec_dot_type == upt.vec_dot_type;
    const uint8_t * xq_gate = share_xq ? s.xq_up : s.xq_gate;
    const size_t hq_row = dnt.act_row_bytes(L.n_ff);

    switch (phase) {
        case 0: {
            convert_rows(upt.act_from_float, upt.vec_dot_type, x, L.n_embd, s.xq_up, xq_up_row,
                         n_tokens, L.n_embd, ith, nth);
            if (!share_xq) {
                convert_rows(L.gate.wt->act_from_float, L.gate.wt->vec_dot_type, x, L.n_embd, s.xq_gate,
                             xq_gate_row, n_tokens, L.n_embd, ith, nth);
            }
        } break;
        case 1: {
            // rows in blocks of kRowBlock starting at multiples of it, so that ggml's SIMD
            // activation kernels split vector body and scalar tail exactly as on the whole row
            const auto [r0, r1] = split_range(L.n_ff, ith, nth, kRowBlock);
            const int n = (int) L.n_embd;
            float g[kRowBlock], u[kRowBlock];
            for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
                const int cnt = (int) (std::min(rb + kRowBlock, r1) - rb);
                for (int64_t t = 0; t < n_tokens; ++t) {
                    const uint8_t * xu = s.xq_up + t * xq_up_row;
                    const uint8_t * xg = xq_gate + t * (share_xq ? xq_up_row : xq_gate_row);
                    for (int j = 0; j < cnt; ++j) {
                        upt.vec_dot(n, &u[j], 0, L.up.row(rb + j), 0, xu, 0, 1);
                        if (!L.up_bias.empty()) {
                            u[j] += L.up_bias[rb + j];
                        }
                        if (L.gated) {
                            L.gate.wt->vec_dot(n, &g[j], 0, L.gate.row(rb + j), 0, xg, 0, 1);
                            if (!L.gate_bias.empty()) {
                                g[j] += L.gate_bias[rb + j];
                            }
                        }
                    }
                    activate_rows(L.act, L.gated, cnt, s.h + t * L.n_ff + rb, g, u);
                }
            }
        } break;
        case 2: {
            convert_rows(dnt.act_from_float, dnt.vec_dot_type, s.h, L.n_ff, s.hq, hq_row,
                         n_tokens, L.n_ff, ith, nth);
        } break;
        case 3: {
            const auto [e0, e1] = split_range(L.n_out, ith, nth, kRowBlock);
            const int n = (int) L.n_ff;
            for (int64_t eb = e0; eb < e1; eb += kRowBlock) {
                const int64_t ee = std::min(eb + kRowBlock, e1);
                for (int64_t t = 0; t < n_tokens; ++t) {
                    const uint8_t * hqt = s.hq + t * hq_row;
                    float * yt = y + t * L.n_out;
                    for (int64_t e = eb; e < ee; ++e) {
                        float v;
                        dnt.vec_dot(n, &v, 0, L.down.row(e), 0, hqt, 0, 1);
                        yt[e] = L.down_bias.empty() ? v : v + L.down_bias[e];
                    }
                }
            }
        } break;
        default:
            break;
    }
}

} // namespace neuralink
