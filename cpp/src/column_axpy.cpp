#include "neuralink/column_axpy.h"

#include <cstring>

// function multi-versioning: one clone per instruction set, chosen by the loader (GNU ifunc, x86-64 Linux)
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__) && !defined(__ANDROID__)
#define NL_CLONES __attribute__((target_clones("arch=skylake-avx512", "arch=haswell", "default")))
#else
#define NL_CLONES
#endif

namespace neuralink {

namespace {

// IEEE half to float, exactly (ggml_fp16_to_fp32 is a call per block; this inlines into the clones)
inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t) (h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t man = h & 0x3ffu;
    uint32_t bits;
    if (exp == 0x1fu) {
        bits = sign | 0x7f800000u | (man << 13);           // infinity, NaN
    } else if (exp != 0) {
        bits = sign | ((exp + 112u) << 23) | (man << 13);  // normal: rebias 15 -> 127
    } else if (man != 0) {
        float f = (float) man * 0x1p-24f;                   // subnormal: man * 2^-24
        std::memcpy(&bits, &f, sizeof bits);
        bits |= sign;
    } else {
        bits = sign;
    }
    float out;
    std::memcpy(&out, &bits, sizeof out);
    return out;
}

constexpr int64_t kQ8Block = 32;
constexpr size_t kQ8BlockBytes = 2 + kQ8Block; // fp16 scale, 32 int8 values (ggml's block_q8_0)

NL_CLONES void q8_0_axpy(const uint8_t * column, float h, float * y, int64_t n) {
    for (int64_t b = 0; b < n / kQ8Block; ++b) {
        const uint8_t * block = column + (size_t) b * kQ8BlockBytes;
        uint16_t d;
        std::memcpy(&d, block, sizeof d);
        const float s = h * half_to_float(d);
        const int8_t * q = (const int8_t *) (block + 2);
        float * yb = y + b * kQ8Block;
        for (int64_t i = 0; i < kQ8Block; ++i) yb[i] += s * (float) q[i];
    }
}

NL_CLONES void axpy(const float * x, float h, float * y, int64_t n) {
    for (int64_t i = 0; i < n; ++i) y[i] += h * x[i];
}

} // namespace

void float_axpy(const float * x, float h, float * y, int64_t n) { axpy(x, h, y, n); }

void column_axpy(const WeightType & wt, const uint8_t * column, float h, float * y, int64_t n, float * tmp) {
    if (wt.type == GGML_TYPE_Q8_0) {
        q8_0_axpy(column, h, y, n);
        return;
    }
    wt.to_float(column, tmp, n);
    axpy(tmp, h, y, n);
}

} // namespace neuralink
