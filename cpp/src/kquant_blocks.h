#pragma once

// Facts of ggml's q5_K and q4_K blocks that the column loops (kquant_columns.cpp) and the row dot products
// (kquant_dots.cpp) both decode: 256 values in eight sub-blocks of 32, an fp16 d and dmin, 12 bytes packing
// eight 6-bit scales and eight 6-bit mins, then (q5_K only) the high bits qh[32], then the low 4 bits qs[128].

#include "simd.h"

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace neuralink {

constexpr int64_t kKBlock = 256; // values per block, in every K-quant (q6_K too)
constexpr size_t kKScalesAt = 4;

template <bool kHighBit> constexpr size_t k_block_bytes() { return kHighBit ? 176 : 144; }
template <bool kHighBit> constexpr size_t k_low_bits_at() { return kHighBit ? 48 : 16; }

// The eight 6-bit scales (bytes 0-7 of the result) and mins (bytes 8-15) of a block, unpacked from their 12
// bytes four at a time: the same values as ggml's get_scale_min_k4 for sub-blocks 0-7.
NL_INLINE void k_scales_mins(const uint8_t * block, uint8_t * out) {
    constexpr uint32_t low6 = 0x3f3f3f3f, low4 = 0x0f0f0f0f, low2 = 0x03030303;
    uint32_t u[3];
    std::memcpy(u, block + kKScalesAt, sizeof u);
    const uint32_t packed[4] = {
        u[0] & low6,                                  // scales 0-3: the low 6 bits of bytes 0-3
        (u[2] & low4) | (((u[0] >> 6) & low2) << 4),  // scales 4-7: bytes 8-11's low nibbles, bytes 0-3's top bits
        u[1] & low6,                                  // mins 0-3: the low 6 bits of bytes 4-7
        ((u[2] >> 4) & low4) | (((u[1] >> 6) & low2) << 4), // mins 4-7: bytes 8-11's high nibbles, 4-7's top bits
    };
    std::memcpy(out, packed, sizeof packed);
}

// the block's fp16 d and dmin (converted by the caller, whose target has F16C)
NL_INLINE void k_super_scales(const uint8_t * block, uint16_t * d, uint16_t * dmin) {
    std::memcpy(d, block, sizeof *d);
    std::memcpy(dmin, block + 2, sizeof *dmin);
}

} // namespace neuralink
