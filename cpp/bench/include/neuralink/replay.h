#pragma once

// Replaying recorded activation traces as flash reads, the way one compute
// thread of the engine issues them: per token and layer, look the active
// neurons up in a DRAM cache, plan reads for the misses, submit them all,
// wait, admit what was read. `neuralink bench io` runs one Replayer per
// variant (llama.cpp-style per-tensor reads, LLM in a Flash, Neuralink-S,
// Neuralink, dense) over the same trace and compares their reads and times.

#include "neuralink/bundle_cache.h"
#include "neuralink/defaults.h"
#include "neuralink/direct_file.h"
#include "neuralink/io_pool.h"
#include "neuralink/read_planner.h"
#include "neuralink/read_queue.h"

#include <cstddef>
#include <cstdint>
#include <list>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace neuralink {

// How needed records become reads.
enum class ReplayPlan {
    Runs,      // one read per maximal run of consecutive needed records (no merging across gaps or blocks)
    Collapse,  // plan_reads: runs closer than the collapse gap merge, touching aligned blocks merge
    Whole,     // every record of the region, sequentially (plan_whole_region); the trace only counts as "needed"
    Adaptive,  // Collapse with the gap of an AdaptiveCollapse fitted to the replay's own reads, from the prior
               // collapse_gap_bytes and bandwidth_bytes_s
};
const char * replay_plan_name(ReplayPlan plan);
ReplayPlan replay_plan_from_name(const std::string & name); // throws std::invalid_argument

// Runs of consecutive needed positions as aligned reads, each capped at max_read_bytes (0: no cap).
std::vector<PlannedRead> plan_runs(const BundleRegion & region, const uint32_t * needed, size_t n_needed,
                                   uint64_t max_read_bytes, size_t align = kDirectAlign);

// LLM in a Flash's sliding window: the records of neurons active in the last
// `window` tokens stay in DRAM, least recently active dropped first when the
// budget is full. Charged like BundleCache: each record's slot (rounded to
// kSlotAlign) plus kLiveEntryBytes of bookkeeping.
class WindowCache {
public:
    WindowCache(uint32_t window_tokens, size_t capacity_bytes, std::vector<size_t> record_bytes);

    // drops records whose neuron was last active before token - window
    void start_token(uint64_t token);
    // copies a cached record into dst and marks it active in the current token
    bool lookup(uint32_t layer, uint32_t pos, uint8_t * dst);
    // caches a record read for the current token, making room by dropping the least recently active
    void admit(uint32_t layer, uint32_t pos, const uint8_t * record);

    size_t used_bytes() const { return used_; }
    size_t entries() const { return map_.size(); }
    uint64_t hits() const { return hits_; }
    uint64_t lookups() const { return lookups_; }

private:
    struct Entry {
        uint64_t key;
        uint64_t last_token;
        std::vector<uint8_t> record;
    };
    size_t charge(uint32_t layer) const;
    void drop_back();

    const uint32_t window_;
    const size_t capacity_;
    const std::vector<size_t> record_bytes_;
    uint64_t token_ = 0;
    size_t used_ = 0;
    uint64_t hits_ = 0, lookups_ = 0;
    std::list<Entry> lru_; // most recently active first
    std::unordered_map<uint64_t, std::list<Entry>::iterator> map_;
};

struct ReplayOptions {
    ReplayPlan plan = ReplayPlan::Collapse;
    uint64_t collapse_gap_bytes = 0;    // Collapse: merge runs whose gap is at most this many bytes (Adaptive: at first)
    double bandwidth_bytes_s = kDefaultBandwidthBytesS; // Adaptive: the prior's bandwidth
    uint64_t max_read_bytes = kDefaultMaxReadBytes;  // split longer reads (0: no cap)
    int queue_depth = kDefaultQueueDepth;
    IoBackend io_backend = IoBackend::Auto;
    bool direct = true;
    CachePolicy cache_policy = CachePolicy::None;
    size_t cache_bytes = 0;
    double p_run = 0.1;                 // linking: admission probability inside runs
    uint32_t window_tokens = 0;         // > 0: a WindowCache of this many tokens instead of cache_policy
};

// One token of a replay, summed over its steps.
struct ReplayTokenStats {
    uint32_t needed = 0;           // records the trace asked for (each region of a step counts its own)
    uint32_t hits = 0;             // of those, served from the cache
    uint32_t reads = 0;
    uint32_t needed_read = 0;      // needed records that came from flash
    uint64_t records_spanned = 0;  // records the reads covered, gaps included (alignment padding not)
    uint64_t spanned_bytes = 0;    // bytes of those records
    uint64_t bytes_read = 0;       // bytes the reads moved, alignment included
    uint64_t needed_bytes = 0;     // bytes of the needed records that came from flash
    uint64_t io_ns = 0;            // sum over steps of first read issued -> last read completed
};

// Replays traces against one file. A "step" is what one layer evaluation
// reads at once: one or more regions (a bundle store; or a layer's gate, up
// and down tensors) that all need the same positions. Cache state carries
// over between replay() calls, so variants can take turns on chunks of tokens.
class Replayer {
public:
    // region i of the file is cache layer i; steps[s] lists the regions step s reads
    Replayer(const std::string & path, std::vector<BundleRegion> regions, std::vector<std::vector<uint32_t>> steps,
             const ReplayOptions & options);
    ~Replayer();

    Replayer(const Replayer &) = delete;
    Replayer & operator=(const Replayer &) = delete;

    // Pinned caches only: pin the most frequent records (frequency[region][pos]) before replaying.
    void pin(const std::vector<std::vector<float>> & frequency);

    // Tokens [token_begin, token_end) of a trace in CSR form: the positions of
    // token t, step s are positions[offsets[t * n_steps + s] .. offsets[t * n_steps + s + 1]),
    // sorted and unique. Throws std::invalid_argument for malformed traces, IoError for failed reads.
    std::vector<ReplayTokenStats> replay(const uint32_t * positions, size_t n_positions, const uint64_t * offsets,
                                         size_t n_offsets, size_t token_begin, size_t token_end);

    size_t n_steps() const { return steps_.size(); }
    bool direct() const { return file_->direct(); }
    const std::string & io_note() const { return file_->note(); }
    IoBackend io_backend() const { return backend_; }
    const std::string & io_backend_note() const { return backend_note_; }
    // bytes the cache holds now (records and bookkeeping)
    size_t cache_used_bytes() const;
    // the gap read through now, bytes (Collapse: the fixed one; Adaptive: the current fit's; else 0)
    uint64_t collapse_gap_bytes() const;

private:
    struct Slot {
        PendingRead read;
        PlannedRead plan;
        uint32_t region = 0;
    };
    void check_trace(const uint32_t * positions, size_t n_positions, const uint64_t * offsets, size_t n_offsets,
                     size_t token_end) const;
    void replay_step(uint32_t step, const uint32_t * needed, size_t n_needed, ReplayTokenStats & st);
    bool cache_lookup(uint32_t region, uint32_t pos);
    void cache_admit(uint32_t region, uint32_t pos, const uint8_t * record, bool isolated);
    uint32_t max_gap_records(const BundleRegion & region) const;

    std::unique_ptr<DirectFile> file_;
    std::vector<BundleRegion> regions_;
    std::vector<std::vector<uint32_t>> steps_;
    ReplayOptions options_;
    IoBackend backend_ = IoBackend::Pread;
    std::string backend_note_;
    FaultPlan faults_;
    std::unique_ptr<IoPool> pool_;
    std::unique_ptr<ReadQueue> queue_;
    std::unique_ptr<BundleCache> cache_;
    std::unique_ptr<WindowCache> window_;
    std::unique_ptr<AdaptiveCollapse> collapse_; // the Adaptive plan's fit
    uint64_t token_ = 0; // tokens replayed so far: the window's clock

    // scratch reused across steps
    std::vector<uint32_t> misses_;
    std::vector<std::unique_ptr<Slot>> slots_;
    std::vector<PendingRead *> batch_;
    AlignedBuffer arena_;
    std::vector<uint8_t> record_copy_;
};

} // namespace neuralink
