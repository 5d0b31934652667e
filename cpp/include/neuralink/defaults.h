#pragma once

// The engine's defaults, defined here once: the bindings export them to Python
// (neuralink._engine.DEFAULT_*), the runner and the replayer take them from here.

#include <cstdint>

namespace neuralink {

// the phone-flash read cost used without a measured device profile (DESIGN.md):
// ~60 us per read at queue depth 1, ~1.4 GB/s for long reads
constexpr double kDefaultReadLatencyS = 60e-6;
constexpr double kDefaultBandwidthBytesS = 1.4e9;
// reads in flight: per compute thread with io_uring, in all with the pread pool
constexpr int kDefaultQueueDepth = 8;
// longer reads are split
constexpr uint64_t kDefaultMaxReadBytes = 1 << 20;

} // namespace neuralink
