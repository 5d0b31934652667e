#pragma once

// A DRAM cache of neuron bundles, keyed by (layer, position in placed order),
// shared by the compute threads of the online engine. Every byte it holds,
// records and bookkeeping alike, stays within capacity_bytes.
//
// Memory: the bookkeeping tables are allocated at construction for the most
// entries the budget can hold, and charged up front; record slots are
// allocated on first use and then recycled, so admissions after warm-up do
// not allocate (except when the mix of layers with different record sizes
// shifts). Per entry the tables cost kLiveEntryBytes, plus kGhostEntryBytes
// for each ghost key the S3-FIFO policies remember (~0.9 per entry). Not
// counted: malloc's header of each slot (8 B in glibc) and this object.

#include <cstddef>
#include <cstdint>
#include <functional>
#include <mutex>
#include <string>
#include <vector>

namespace neuralink {

// Stream is no cache at all: each layer's record regions are read whole, ahead of the layer (RegionStream,
// SparseFfn); to a BundleCache it is None.
enum class CachePolicy { None, Lru, S3Fifo, Linking, Pinned, Stream };

// How a policy behaves, as the cache's operations read it (one row per policy in bundle_cache.cpp).
struct CachePolicyTraits {
    bool holds;       // keeps records at all (none: no tables, no entries)
    bool admits;      // admit() inserts what was read (pinned fills once, through pin_hottest)
    bool lru;         // one recency-ordered queue: a hit moves to the front, eviction takes the back
    bool s3fifo;      // a probation (small) and a main queue, 2-bit use counters and ghost keys
    bool run_sampled; // linking: a neuron read inside a run is admitted with probability p_run
};
const CachePolicyTraits & cache_policy_traits(CachePolicy policy);

// "none", "lru", "s3fifo", "linking", "pinned", "stream"
const char * cache_policy_name(CachePolicy policy);
// throws std::invalid_argument naming the valid names
CachePolicy cache_policy_from_name(const std::string & name);
const std::vector<std::string> & cache_policy_names();

struct CacheStats {
    uint64_t lookups = 0;
    uint64_t hits = 0;
    uint64_t admissions = 0;  // records admit() inserted
    uint64_t rejections = 0;  // records admit() declined (policy, p_run draw, or larger than the budget)
    uint64_t evictions = 0;   // records dropped to make room
    size_t used_bytes = 0;    // table_bytes + record slots held (live and recycled); <= capacity_bytes
    size_t capacity_bytes = 0;
    size_t table_bytes = 0;   // bookkeeping tables, reserved at construction
    size_t entries = 0;       // records cached
    size_t ghost_entries = 0; // keys remembered by the ghost queue (s3fifo, linking)
};

struct BundleCacheOptions {
    // linking: probability of admitting a neuron read inside a multi-neuron run
    double p_run = 0.1;
    // upper bound on cached records, 0 for as many as the budget holds; pass
    // the model's neuron count (sum of n_ff) so that a budget larger than the
    // FFN weights does not reserve tables for entries that can never exist
    size_t max_entries = 0;
};

class BundleCache {
public:
    // table bytes per cached record (entry 24 B + 2 index slots) and per ghost key (key 8 B + 2 index slots)
    static constexpr size_t kLiveEntryBytes = 32;
    static constexpr size_t kGhostEntryBytes = 16;
    // record slots are rounded up to this many bytes (malloc's granularity), and charged with malloc's chunk
    // header on top (glibc: 16 bytes for such a size): what the process really holds per cached record
    static constexpr size_t kSlotAlign = 16;
    static constexpr size_t kMallocChunkOverhead = 16;

    // record_bytes[l]: bytes of one record of layer l. Throws std::invalid_argument
    // for an empty list, a zero size, more than 65536 layers, or p_run outside [0, 1].
    BundleCache(CachePolicy policy, size_t capacity_bytes, std::vector<size_t> record_bytes,
                const BundleCacheOptions & options = {});
    ~BundleCache();

    // The capacity at which a cache of `policy` holds every record: records_per_key records of each size in
    // record_bytes (their slots and tables; max_entries = record_bytes.size() * records_per_key).
    static size_t bytes_to_hold(CachePolicy policy, const std::vector<size_t> & record_bytes, size_t records_per_key);

    BundleCache(const BundleCache &) = delete;
    BundleCache & operator=(const BundleCache &) = delete;

    // Pinned only, once: caches the globally most frequent neurons
    // (frequency[l][p], placed order; ties by layer then position) that fit,
    // reading each through read_record(layer, pos, dst), which is called
    // without the cache's lock. A record that does not fit is skipped so that
    // smaller records of other layers can still use the rest of the budget.
    // If read_record throws, the cache is left empty and the exception propagates.
    void pin_hottest(const std::vector<std::vector<float>> & frequency,
                     const std::function<void(uint32_t, uint32_t, uint8_t *)> & read_record);

    // If (layer, pos) is cached, copies its record_bytes(layer) bytes into dst,
    // records the hit and returns true. Throws std::invalid_argument for a layer out of range.
    bool lookup(uint32_t layer, uint32_t pos, uint8_t * dst);

    // Whether a cached record stays where it is for the cache's lifetime (pinned: filled once, never
    // evicted), so that lookup_in_place may hand out its slot instead of a copy.
    bool records_stay_put() const { return policy_ == CachePolicy::Pinned; }
    // The slot of (layer, pos) when cached, recording the hit, else nullptr. Only where records_stay_put():
    // throws std::logic_error otherwise (another policy may recycle the slot while the caller reads it).
    const uint8_t * lookup_in_place(uint32_t layer, uint32_t pos);

    // Offers a record just read from flash; isolated = it was read alone (a
    // whole I/O operation for one neuron). A key that is already cached (another
    // thread admitted it first) is left as it is and counted nowhere.
    void admit(uint32_t layer, uint32_t pos, const uint8_t * record, bool isolated);

    CacheStats stats() const;
    void reset_stats();

    CachePolicy policy() const { return policy_; }
    size_t capacity_bytes() const { return capacity_; }
    size_t n_layers() const { return record_bytes_.size(); }
    size_t record_bytes(uint32_t layer) const;
    // most records the tables can index (0 when not even one record fits)
    size_t max_entries() const { return entries_.size(); }

private:
    static constexpr uint32_t kNil = UINT32_MAX;

    struct Entry {
        uint32_t  pos;
        uint16_t  layer;
        uint8_t   queue; // Queue
        uint8_t   freq;  // S3-FIFO's 2-bit access count
        uint32_t  prev, next;
        uint8_t * slot;
    };
    struct List {
        uint32_t head = kNil, tail = kNil, count = 0;
        size_t   bytes = 0;
    };
    struct SizeClass {
        size_t    slot_bytes;
        uint8_t * free_slots; // intrusive free list: each free slot stores the next one's address
    };

    void check_layer(uint32_t layer) const;
    size_t slot_bytes(uint32_t layer) const { return classes_[class_of_layer_[layer]].slot_bytes; }
    uint64_t key_at(uint32_t ref) const;
    size_t find(uint64_t key) const;
    // the entry of a cached (not ghost) key, kNil when there is none; the caller holds the lock
    uint32_t live_entry(uint64_t key) const;
    void index_insert(uint64_t key, uint32_t ref);
    void index_erase(size_t at);
    void push_front(List & list, uint32_t e);
    void unlink(List & list, uint32_t e);
    List & list_of(const Entry & e);
    static uint8_t * pop_slot(SizeClass & sc);
    uint8_t * acquire_slot(uint32_t layer);
    void release_slot(uint32_t layer, uint8_t * slot);
    void insert(uint32_t layer, uint32_t pos, const uint8_t * record, List & list);
    void remove(uint32_t e);
    void make_room(size_t slot);
    bool evict_one();
    bool evict_small();
    bool evict_main();
    void remember_ghost(uint64_t key);
    void forget_ghost(size_t at);
    bool draw_run_admission(uint64_t key);
    void clear_entries();

    const CachePolicy policy_;
    const CachePolicyTraits & traits_;
    const size_t capacity_;
    const std::vector<size_t> record_bytes_;
    const double p_run_;
    std::vector<uint8_t> class_of_layer_;
    std::vector<SizeClass> classes_;

    size_t table_bytes_ = 0;
    size_t record_budget_ = 0; // capacity_ - table_bytes_: for record slots
    size_t small_target_ = 0;  // S3-FIFO: the small queue's share of record_budget_ (10 %)

    std::vector<Entry> entries_;
    std::vector<uint64_t> ghosts_; // FIFO ring of evicted keys; kNoKey marks a slot forgotten by a ghost hit
    std::vector<uint32_t> index_;  // open addressing: entry number, or ghost ring slot | kGhostRef
    uint32_t free_entry_ = 0;      // head of the free entries, linked through next
    uint32_t ghost_next_ = 0;      // ring slot the next ghost key overwrites
    size_t ghost_count_ = 0;
    List small_, main_;            // LRU and pinned entries live in main_
    size_t live_bytes_ = 0;        // slots of cached records
    size_t held_bytes_ = 0;        // slots allocated: cached plus recycled, <= record_budget_
    uint64_t offers_ = 0;          // admit() calls: the counter in linking's p_run draw
    enum class PinState { Unpinned, Pinning, Pinned } pin_state_ = PinState::Unpinned;
    CacheStats counters_;
    mutable std::mutex mutex_;
};

} // namespace neuralink
