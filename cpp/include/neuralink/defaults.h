#pragma once

// The engine's defaults, defined here once: the bindings export them to Python
// (neuralink._engine.DEFAULT_*), the runner and the replayer take them from here.

#include <cstddef>
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
// the pieces a streamed region (records read whole, ahead of the layer) is read in, all in flight at once: more,
// shorter reads keep more of the device busy. Measured with neuralink-run on Qwen2.5-Coder-1.5B (virtio disk on an
// EPYC host, alternating builds): under 530MB 5.06-5.26 tok/s with 1 MiB pieces, 5.30-5.40 with 512 KiB,
// 5.33-5.59 with 256 KiB, 5.24-5.70 with 128 KiB; under 800MB 9.28-9.46, 9.26-9.91, 10.01-10.21, 8.87-9.41
constexpr uint64_t kStreamChunkBytes = 256 << 10;
// buffers of the stream of gate rows (GateStream): one, released after the layer's prediction, so the floor holds one
// layer's rows (the memory plan counts this many)
constexpr size_t kGateStreamBuffers = 1;
// prompt tokens per decode call under a memory budget when none is asked for (llama.cpp's 512 costs ~65 MiB more
// of the budget on Qwen2.5-Coder-1.5B: token lookups, the engine's scratch, llama.cpp's buffers; memory_plan.h)
constexpr int kBudgetBatch = 64;

} // namespace neuralink
