#pragma once

// The sidecar's checksum: a 64-bit, four-lane multiply-rotate hash of a byte
// range (the xxHash64 construction: lanes v[i % 4] = rotl(v + w_i * P2, 31) * P1
// over little-endian 64-bit words, a partial last word zero-padded, then the
// lanes merged, the length mixed in and the result avalanched). Not
// cryptographic: it catches corrupted or truncated records, at several GB/s.
// neuralink.formats.checksum computes the same values with numpy.

#include <cstddef>
#include <cstdint>

namespace neuralink {

uint64_t checksum64(const void * data, size_t n, uint64_t seed = 0);

// A long range's checksum: checksum64 of the array of checksum64 of its 4 KiB
// blocks (the last one possibly shorter), so that numpy can hash blocks in parallel.
constexpr size_t kChecksumBlock = 4096;
uint64_t block_checksum64(const void * data, size_t n);

} // namespace neuralink
