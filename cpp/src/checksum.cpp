#include "neuralink/checksum.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace neuralink {

static constexpr uint64_t P1 = 0x9E3779B185EBCA87ULL;
static constexpr uint64_t P2 = 0xC2B2AE3D27D4EB4FULL;
static constexpr uint64_t P3 = 0x165667B19E3779F9ULL;
static constexpr uint64_t P5 = 0x27D4EB2F165667C5ULL;

static inline uint64_t rotl(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t round(uint64_t v, uint64_t w) { return rotl(v + w * P2, 31) * P1; }
static inline uint64_t load(const uint8_t * p) {
    uint64_t w;
    std::memcpy(&w, p, 8); // little-endian on every target neuralink builds for
    return w;
}

uint64_t checksum64(const void * data, size_t n, uint64_t seed) {
    const uint8_t * p = (const uint8_t *) data;
    uint64_t v0 = seed + P1 + P2, v1 = seed + P2, v2 = seed, v3 = seed - P1;
    const size_t words = n / 8;
    size_t i = 0;
    // four words at a time: the lanes are independent, so the multiplies overlap
    for (; i + 4 <= words; i += 4) {
        v0 = round(v0, load(p + 8 * i));
        v1 = round(v1, load(p + 8 * i + 8));
        v2 = round(v2, load(p + 8 * i + 16));
        v3 = round(v3, load(p + 8 * i + 24));
    }
    uint64_t * lanes[4] = { &v0, &v1, &v2, &v3 };
    for (; i < words; ++i) {
        *lanes[i % 4] = round(*lanes[i % 4], load(p + 8 * i));
    }
    if (n % 8) {
        uint8_t last[8] = {};
        std::memcpy(last, p + 8 * words, n % 8);
        *lanes[words % 4] = round(*lanes[words % 4], load(last));
    }
    uint64_t h = rotl(v0, 1) + rotl(v1, 7) + rotl(v2, 12) + rotl(v3, 18);
    h ^= (uint64_t) n * P5;
    h ^= h >> 33;
    h *= P2;
    h ^= h >> 29;
    h *= P3;
    h ^= h >> 32;
    return h;
}

uint64_t block_checksum64(const void * data, size_t n) {
    const uint8_t * p = (const uint8_t *) data;
    std::vector<uint64_t> blocks;
    blocks.reserve(n / kChecksumBlock + 1);
    for (size_t at = 0; at < n; at += kChecksumBlock) {
        blocks.push_back(checksum64(p + at, std::min(kChecksumBlock, n - at)));
    }
    return checksum64(blocks.data(), blocks.size() * sizeof(uint64_t));
}

} // namespace neuralink
