#include "neuralink/bundle_cache.h"

#include "neuralink/direct_file.h"
#include "neuralink/names.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <stdexcept>

namespace neuralink {

namespace {

constexpr uint32_t kGhostRef = 0x80000000u;   // index values with this bit name a ghost ring slot
constexpr uint64_t kNoKey = UINT64_MAX;       // a ghost ring slot that holds no key
constexpr uint32_t kMaxEntries = 1u << 30;    // keeps entry numbers clear of kGhostRef and kNil
constexpr uint8_t kMaxFreq = 3;               // S3-FIFO's 2-bit counter
constexpr size_t kMaxLayers = 1u << 16;       // Entry::layer is 16 bits
constexpr size_t kIndexSlotsPerKey = 2;       // open addressing at load factor <= 1/2

enum Queue : uint8_t { kFree = 0, kSmall = 1, kMain = 2 }; // Entry::queue; zero so that fresh entries are free

uint64_t make_key(uint32_t layer, uint32_t pos) { return (uint64_t) layer << 32 | pos; }
uint32_t key_layer(uint64_t key) { return (uint32_t) (key >> 32); }
uint32_t key_pos(uint64_t key) { return (uint32_t) key; }

// splitmix64's finalizer: neighbouring positions land far apart in the index
uint64_t mix64(uint64_t x) {
    x ^= x >> 30;
    x *= 0xbf58476d1ce4e5b9ull;
    x ^= x >> 27;
    x *= 0x94d049bb133111ebull;
    return x ^ (x >> 31);
}

// ghost keys: as many as the main queue (90 % of the budget) holds entries
size_t ghost_capacity(const CachePolicyTraits & p, size_t n_entries) { return p.s3fifo ? n_entries - n_entries / 10 : 0; }

size_t table_bytes_for(const CachePolicyTraits & p, size_t n_entries) {
    const size_t n_ghost = ghost_capacity(p, n_entries);
    return n_entries * BundleCache::kLiveEntryBytes + n_ghost * BundleCache::kGhostEntryBytes;
}

constexpr Named<CachePolicy> kPolicyNames[] = {
    { CachePolicy::None, "none" }, { CachePolicy::Lru, "lru" }, { CachePolicy::S3Fifo, "s3fifo" },
    { CachePolicy::Linking, "linking" }, { CachePolicy::Pinned, "pinned" }, { CachePolicy::Stream, "stream" },
};

// What each policy does, one row per CachePolicy in enum order: lookup(), admit() and evict_one()
// read these flags, never the policy itself
constexpr CachePolicyTraits kPolicyTraits[] = {
    //                holds  admits  lru    s3fifo run_sampled
    /* none    */ {   false, false,  false, false, false },
    /* lru     */ {   true,  true,   true,  false, false },
    /* s3fifo  */ {   true,  true,   false, true,  false },
    /* linking */ {   true,  true,   false, true,  true  },
    /* pinned  */ {   true,  false,  false, false, false },
    /* stream  */ {   false, false,  false, false, false },
};

} // namespace

const CachePolicyTraits & cache_policy_traits(CachePolicy policy) {
    if ((int) policy < 0 || (size_t) policy >= std::size(kPolicyTraits)) {
        throw std::invalid_argument("cache policy " + std::to_string((int) policy) + " does not exist");
    }
    return kPolicyTraits[(int) policy];
}

const char * cache_policy_name(CachePolicy policy) { return name_in(kPolicyNames, policy); }

const std::vector<std::string> & cache_policy_names() {
    static const std::vector<std::string> names = [] {
        std::vector<std::string> all;
        for (const auto & n : kPolicyNames) all.push_back(n.name);
        return all;
    }();
    return names;
}

CachePolicy cache_policy_from_name(const std::string & name) { return value_in(kPolicyNames, name, "cache policy"); }

BundleCache::BundleCache(CachePolicy policy, size_t capacity_bytes, std::vector<size_t> record_bytes,
                         const BundleCacheOptions & options)
    : policy_(policy), traits_(cache_policy_traits(policy)), capacity_(capacity_bytes),
      record_bytes_(std::move(record_bytes)), p_run_(options.p_run) {
    static_assert(sizeof(Entry) + kIndexSlotsPerKey * sizeof(uint32_t) == kLiveEntryBytes, "entry layout changed");
    static_assert(sizeof(uint64_t) + kIndexSlotsPerKey * sizeof(uint32_t) == kGhostEntryBytes, "ghost layout changed");
    if (record_bytes_.empty()) {
        throw std::invalid_argument("record_bytes is empty: the cache needs the record size of every layer");
    }
    if (record_bytes_.size() > kMaxLayers) {
        throw std::invalid_argument("record_bytes lists " + std::to_string(record_bytes_.size()) +
                                    " layers, more than the " + std::to_string(kMaxLayers) + " the cache supports");
    }
    if (!(p_run_ >= 0.0 && p_run_ <= 1.0)) {
        throw std::invalid_argument("p_run = " + std::to_string(p_run_) + " is not a probability in [0, 1]");
    }
    size_t min_slot = SIZE_MAX;
    for (size_t l = 0; l < record_bytes_.size(); ++l) {
        const size_t bytes = record_bytes_[l];
        if (bytes == 0 || bytes > SIZE_MAX / 2) {
            throw std::invalid_argument("record_bytes[" + std::to_string(l) + "] = " + std::to_string(bytes) +
                                        " is not a valid record size");
        }
        const size_t slot = align_up(bytes, kSlotAlign) + kMallocChunkOverhead;
        min_slot = std::min(min_slot, slot);
        const auto same = [&](const SizeClass & c) { return c.slot_bytes == slot; };
        const size_t c = std::find_if(classes_.begin(), classes_.end(), same) - classes_.begin();
        if (c == classes_.size()) {
            // class numbers are 8 bits; real models have a handful of distinct record sizes
            if (c == 256) {
                throw std::invalid_argument("record_bytes holds more than 256 distinct slot sizes");
            }
            classes_.push_back({ slot, nullptr });
        }
        class_of_layer_.push_back((uint8_t) c);
    }

    // the most entries whose tables plus smallest records fit the budget
    size_t lo = 0, hi = !traits_.holds ? 0 : std::min<size_t>(capacity_ / min_slot, kMaxEntries);
    if (options.max_entries) {
        hi = std::min(hi, options.max_entries);
    }
    while (lo < hi) {
        const size_t n = lo + (hi - lo + 1) / 2;
        const size_t tables = table_bytes_for(traits_, n);
        if (tables <= capacity_ && (capacity_ - tables) / min_slot >= n) {
            lo = n;
        } else {
            hi = n - 1;
        }
    }
    const size_t n_entries = lo;
    const size_t n_ghost = ghost_capacity(traits_, n_entries);
    table_bytes_ = table_bytes_for(traits_, n_entries);
    record_budget_ = capacity_ - table_bytes_;
    small_target_ = record_budget_ / 10;
    entries_.resize(n_entries);
    for (size_t e = 0; e < n_entries; ++e) {
        entries_[e].next = e + 1 < n_entries ? (uint32_t) (e + 1) : kNil;
    }
    free_entry_ = n_entries ? 0 : kNil;
    ghosts_.assign(n_ghost, kNoKey);
    index_.assign(kIndexSlotsPerKey * (n_entries + n_ghost), kNil);
    counters_.capacity_bytes = capacity_;
}

size_t BundleCache::bytes_to_hold(CachePolicy policy, const std::vector<size_t> & record_bytes,
                                  size_t records_per_key) {
    const CachePolicyTraits & traits = cache_policy_traits(policy);
    if (!traits.holds) {
        return 0;
    }
    size_t slots = 0;
    for (size_t bytes : record_bytes) {
        slots += (align_up(bytes, kSlotAlign) + kMallocChunkOverhead) * records_per_key;
    }
    return slots + table_bytes_for(traits, record_bytes.size() * records_per_key);
}

BundleCache::~BundleCache() {
    for (const Entry & e : entries_) {
        if (e.queue) {
            delete[] e.slot;
        }
    }
    for (SizeClass & c : classes_) {
        while (c.free_slots) {
            delete[] pop_slot(c);
        }
    }
}

size_t BundleCache::record_bytes(uint32_t layer) const {
    check_layer(layer);
    return record_bytes_[layer];
}

void BundleCache::check_layer(uint32_t layer) const {
    if (layer >= record_bytes_.size()) {
        throw std::invalid_argument("layer " + std::to_string(layer) + " is out of range: the cache has " +
                                    std::to_string(record_bytes_.size()) + " layers");
    }
}

// ---- index: open addressing with linear probing and backward-shift deletion (no tombstones)

uint64_t BundleCache::key_at(uint32_t ref) const {
    if (ref & kGhostRef) {
        return ghosts_[ref & ~kGhostRef];
    }
    return make_key(entries_[ref].layer, entries_[ref].pos);
}

static size_t home_of(uint64_t key, size_t n) { return (size_t) (mix64(key) % n); }

size_t BundleCache::find(uint64_t key) const {
    if (index_.empty()) {
        return SIZE_MAX;
    }
    for (size_t i = home_of(key, index_.size());; i = i + 1 == index_.size() ? 0 : i + 1) {
        if (index_[i] == kNil) {
            return SIZE_MAX;
        }
        if (key_at(index_[i]) == key) {
            return i;
        }
    }
}

void BundleCache::index_insert(uint64_t key, uint32_t ref) {
    size_t i = home_of(key, index_.size());
    while (index_[i] != kNil) {
        i = i + 1 == index_.size() ? 0 : i + 1;
    }
    index_[i] = ref;
}

void BundleCache::index_erase(size_t at) {
    const size_t n = index_.size();
    for (size_t j = at + 1 == n ? 0 : at + 1; index_[j] != kNil; j = j + 1 == n ? 0 : j + 1) {
        // a key may fill the hole unless its home lies cyclically in (at, j]
        const size_t home = home_of(key_at(index_[j]), n);
        const bool stays = at < j ? (at < home && home <= j) : (at < home || home <= j);
        if (!stays) {
            index_[at] = index_[j];
            at = j;
        }
    }
    index_[at] = kNil;
}

// ---- queues: intrusive doubly linked lists, head = newest

void BundleCache::push_front(List & list, uint32_t e) {
    Entry & x = entries_[e];
    x.queue = &list == &small_ ? kSmall : kMain;
    x.prev = kNil;
    x.next = list.head;
    if (list.head != kNil) {
        entries_[list.head].prev = e;
    } else {
        list.tail = e;
    }
    list.head = e;
    ++list.count;
    list.bytes += slot_bytes(x.layer);
}

void BundleCache::unlink(List & list, uint32_t e) {
    Entry & x = entries_[e];
    (x.prev != kNil ? entries_[x.prev].next : list.head) = x.next;
    (x.next != kNil ? entries_[x.next].prev : list.tail) = x.prev;
    --list.count;
    list.bytes -= slot_bytes(x.layer);
}

BundleCache::List & BundleCache::list_of(const Entry & e) { return e.queue == kSmall ? small_ : main_; }

// ---- record slots: one recycling free list per record size, all of them within record_budget_

uint8_t * BundleCache::pop_slot(SizeClass & sc) {
    uint8_t * s = sc.free_slots;
    std::memcpy(&sc.free_slots, s, sizeof(uint8_t *));
    return s;
}

uint8_t * BundleCache::acquire_slot(uint32_t layer) {
    SizeClass & sc = classes_[class_of_layer_[layer]];
    if (sc.free_slots) {
        return pop_slot(sc);
    }
    // give back other sizes' idle slots until a fresh one fits: live_bytes_ + slot <= budget guarantees they suffice
    for (SizeClass & other : classes_) {
        while (held_bytes_ + sc.slot_bytes > record_budget_ && other.free_slots) {
            delete[] pop_slot(other);
            held_bytes_ -= other.slot_bytes;
        }
    }
    uint8_t * s = new uint8_t[sc.slot_bytes - kMallocChunkOverhead];
    held_bytes_ += sc.slot_bytes;
    return s;
}

void BundleCache::release_slot(uint32_t layer, uint8_t * slot) {
    SizeClass & sc = classes_[class_of_layer_[layer]];
    std::memcpy(slot, &sc.free_slots, sizeof(uint8_t *));
    sc.free_slots = slot;
}

// ---- entries

void BundleCache::insert(uint32_t layer, uint32_t pos, const uint8_t * record, List & list) {
    uint8_t * slot = acquire_slot(layer); // may throw bad_alloc: nothing is linked yet
    const uint32_t e = free_entry_;
    Entry & x = entries_[e];
    free_entry_ = x.next;
    x.pos = pos;
    x.layer = (uint16_t) layer;
    x.freq = 0;
    x.slot = slot;
    std::memcpy(slot, record, record_bytes_[layer]);
    push_front(list, e);
    index_insert(make_key(layer, pos), e);
    live_bytes_ += slot_bytes(layer);
}

void BundleCache::remove(uint32_t e) {
    Entry & x = entries_[e];
    unlink(list_of(x), e);
    index_erase(find(make_key(x.layer, x.pos)));
    release_slot(x.layer, x.slot);
    live_bytes_ -= slot_bytes(x.layer);
    x.queue = kFree;
    x.slot = nullptr;
    x.next = free_entry_;
    free_entry_ = e;
}

void BundleCache::make_room(size_t slot) {
    while (live_bytes_ + slot > record_budget_ || free_entry_ == kNil) {
        if (!evict_one()) {
            // unreachable while slot <= record_budget_ and the cache has an entry
            throw std::runtime_error("bundle cache: no room for a " + std::to_string(slot) +
                                     "-byte slot after evicting everything");
        }
    }
}

bool BundleCache::evict_one() {
    if (traits_.lru) {
        if (main_.tail == kNil) {
            return false;
        }
        remove(main_.tail);
        ++counters_.evictions;
        return true;
    }
    // as libCacheSim's S3-FIFO: the main queue gives way only when over its share or when small is empty
    if (main_.bytes > record_budget_ - small_target_ || small_.count == 0) {
        return evict_main() || evict_small();
    }
    return evict_small() || evict_main();
}

bool BundleCache::evict_small() {
    while (small_.tail != kNil) {
        const uint32_t e = small_.tail;
        Entry & x = entries_[e];
        if (x.freq > 0) {
            // reused while on probation: promoted, and must earn its re-insertions in main anew
            unlink(small_, e);
            x.freq = 0;
            push_front(main_, e);
            continue;
        }
        const uint64_t key = make_key(x.layer, x.pos);
        remove(e);
        ++counters_.evictions;
        remember_ghost(key);
        return true;
    }
    return false;
}

bool BundleCache::evict_main() {
    // terminates: every pass over an entry lowers its freq, and freq <= kMaxFreq
    while (main_.tail != kNil) {
        const uint32_t e = main_.tail;
        Entry & x = entries_[e];
        if (x.freq > 0) {
            --x.freq;
            unlink(main_, e);
            push_front(main_, e);
            continue;
        }
        remove(e);
        ++counters_.evictions;
        return true;
    }
    return false;
}

void BundleCache::remember_ghost(uint64_t key) {
    if (ghosts_.empty()) {
        return;
    }
    uint64_t & slot = ghosts_[ghost_next_];
    if (slot != kNoKey) {
        index_erase(find(slot)); // the oldest ghost key falls out of the ring
        --ghost_count_;
    }
    slot = key;
    index_insert(key, ghost_next_ | kGhostRef);
    ++ghost_count_;
    ghost_next_ = ghost_next_ + 1 == ghosts_.size() ? 0 : ghost_next_ + 1;
}

void BundleCache::forget_ghost(size_t at) {
    ghosts_[index_[at] & ~kGhostRef] = kNoKey;
    index_erase(at);
    --ghost_count_;
}

bool BundleCache::draw_run_admission(uint64_t key) {
    // a hash of (layer, pos, admit() call number): uniform, and the same choices when a call sequence is replayed
    const uint64_t h = mix64(key ^ mix64(offers_ + 0x9e3779b97f4a7c15ull));
    return (double) (h >> 11) * 0x1.0p-53 < p_run_;
}

void BundleCache::clear_entries() {
    for (uint32_t e = 0; e < entries_.size(); ++e) {
        if (entries_[e].queue != kFree) {
            remove(e);
        }
    }
}

// ---- public operations

void BundleCache::pin_hottest(const std::vector<std::vector<float>> & frequency,
                              const std::function<void(uint32_t, uint32_t, uint8_t *)> & read_record) {
    if (policy_ != CachePolicy::Pinned) {
        throw std::invalid_argument(std::string("pin_hottest() needs the 'pinned' policy; this cache is '") +
                                    cache_policy_name(policy_) + "'");
    }
    if (frequency.size() != record_bytes_.size()) {
        throw std::invalid_argument("frequency lists " + std::to_string(frequency.size()) +
                                    " layers, the cache has " + std::to_string(record_bytes_.size()));
    }
    if (!read_record) {
        throw std::invalid_argument("pin_hottest() needs a read_record function");
    }
    std::vector<uint64_t> order;
    for (uint32_t l = 0; l < frequency.size(); ++l) {
        for (uint32_t p = 0; p < frequency[l].size(); ++p) {
            if (std::isnan(frequency[l][p])) {
                throw std::invalid_argument("frequency[" + std::to_string(l) + "][" + std::to_string(p) + "] is NaN");
            }
            order.push_back(make_key(l, p));
        }
    }
    {
        std::lock_guard<std::mutex> lock(mutex_);
        if (pin_state_ != PinState::Unpinned) {
            throw std::runtime_error("pin_hottest() was already called on this cache");
        }
        pin_state_ = PinState::Pinning;
    }
    auto freq_of = [&](uint64_t k) { return frequency[key_layer(k)][key_pos(k)]; };
    std::stable_sort(order.begin(), order.end(), [&](uint64_t a, uint64_t b) { return freq_of(a) > freq_of(b); });
    size_t min_slot = SIZE_MAX;
    for (const SizeClass & c : classes_) {
        min_slot = std::min(min_slot, c.slot_bytes);
    }
    // which records fit, hottest first (as inserting them one by one decides), then read in (layer, position)
    // order: placement puts hot neurons side by side, so the reader can serve neighbours from one long read
    std::vector<uint64_t> chosen;
    {
        std::lock_guard<std::mutex> lock(mutex_);
        size_t free_entries = 0;
        for (uint32_t e = free_entry_; e != kNil; e = entries_[e].next) ++free_entries;
        size_t live = live_bytes_;
        for (uint64_t k : order) {
            if (free_entries == 0 || live + min_slot > record_budget_) {
                break;
            }
            const size_t slot = slot_bytes(key_layer(k));
            if (live + slot > record_budget_) {
                continue;
            }
            live += slot;
            --free_entries;
            chosen.push_back(k);
        }
    }
    std::sort(chosen.begin(), chosen.end());
    std::vector<uint8_t> record(*std::max_element(record_bytes_.begin(), record_bytes_.end()));
    try {
        for (uint64_t k : chosen) {
            const uint32_t layer = key_layer(k), pos = key_pos(k);
            {
                // only pin_hottest inserts into a pinned cache, so room checked here is still there below
                std::lock_guard<std::mutex> lock(mutex_);
                if (free_entry_ == kNil || live_bytes_ + min_slot > record_budget_) {
                    break;
                }
                if (live_bytes_ + slot_bytes(layer) > record_budget_) {
                    continue;
                }
            }
            read_record(layer, pos, record.data());
            std::lock_guard<std::mutex> lock(mutex_);
            insert(layer, pos, record.data(), main_);
        }
    } catch (...) {
        std::lock_guard<std::mutex> lock(mutex_);
        clear_entries();
        pin_state_ = PinState::Unpinned;
        throw;
    }
    std::lock_guard<std::mutex> lock(mutex_);
    pin_state_ = PinState::Pinned;
}

uint32_t BundleCache::live_entry(uint64_t key) const {
    const size_t at = find(key);
    return at == SIZE_MAX || (index_[at] & kGhostRef) ? kNil : index_[at];
}

bool BundleCache::lookup(uint32_t layer, uint32_t pos, uint8_t * dst) {
    check_layer(layer);
    std::lock_guard<std::mutex> lock(mutex_);
    ++counters_.lookups;
    const uint32_t e = live_entry(make_key(layer, pos));
    if (e == kNil) {
        return false;
    }
    Entry & x = entries_[e];
    // copied under the lock so that no eviction can recycle the slot mid-copy (a few KiB: ~100 ns)
    std::memcpy(dst, x.slot, record_bytes_[layer]);
    ++counters_.hits;
    if (traits_.lru) {
        unlink(main_, e);
        push_front(main_, e);
    } else if (traits_.s3fifo && x.freq < kMaxFreq) {
        ++x.freq;
    }
    return true;
}

const uint8_t * BundleCache::lookup_in_place(uint32_t layer, uint32_t pos) {
    if (!records_stay_put()) {
        throw std::logic_error(std::string("the ") + cache_policy_name(policy_) +
                               " cache may evict a record while it is read: look it up with a copy");
    }
    check_layer(layer);
    std::lock_guard<std::mutex> lock(mutex_);
    ++counters_.lookups;
    const uint32_t e = live_entry(make_key(layer, pos));
    if (e == kNil) {
        return nullptr;
    }
    ++counters_.hits;
    return entries_[e].slot;
}

void BundleCache::admit(uint32_t layer, uint32_t pos, const uint8_t * record, bool isolated) {
    check_layer(layer);
    std::lock_guard<std::mutex> lock(mutex_);
    ++offers_;
    if (!traits_.admits) {
        ++counters_.rejections;
        return;
    }
    const uint64_t key = make_key(layer, pos);
    const size_t at = find(key);
    if (at != SIZE_MAX && !(index_[at] & kGhostRef)) {
        return;
    }
    const bool ghost_hit = at != SIZE_MAX;
    // linking: a neuron inside a run costs almost nothing to re-read with its neighbours, one read alone costs an
    // I/O; that choice only matters when admitting means evicting: free room takes every record
    const bool room = free_entry_ != kNil && live_bytes_ + slot_bytes(layer) <= record_budget_;
    if ((traits_.run_sampled && !isolated && !ghost_hit && !room && !draw_run_admission(key)) ||
        entries_.empty() || slot_bytes(layer) > record_budget_) {
        ++counters_.rejections;
        return;
    }
    if (ghost_hit) {
        forget_ghost(at); // before evictions move the index around
    }
    make_room(slot_bytes(layer));
    // recently evicted keys skip probation: S3-FIFO's ghost hit
    insert(layer, pos, record, !traits_.s3fifo || ghost_hit ? main_ : small_);
    ++counters_.admissions;
}

CacheStats BundleCache::stats() const {
    std::lock_guard<std::mutex> lock(mutex_);
    CacheStats s = counters_;
    s.used_bytes = table_bytes_ + held_bytes_;
    s.table_bytes = table_bytes_;
    s.entries = small_.count + main_.count;
    s.ghost_entries = ghost_count_;
    return s;
}

void BundleCache::reset_stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    counters_ = CacheStats();
    counters_.capacity_bytes = capacity_;
}

} // namespace neuralink
