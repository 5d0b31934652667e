#pragma once

// The whole bundle store in DRAM, used in place of the bundle cache when its
// budget holds every record: each record is copied into its own fixed place
// the first time it is read and never moves or leaves, so a lookup is a flag
// test and a pointer, with no lock, hash or copy. Pages of records never read
// are never touched, so the memory held grows with what was read.

#include "neuralink/bundle_cache.h"

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

namespace neuralink {

class StoreArena {
public:
    // bytes the arena needs at most: records_per_key records of each size, and a state byte per record
    static size_t bytes_for(const std::vector<size_t> & record_bytes, size_t records_per_key);

    // record_bytes[k]: bytes of one record of key k. Throws std::invalid_argument for an empty list or a zero size.
    StoreArena(std::vector<size_t> record_bytes, size_t records_per_key, size_t capacity_bytes);

    StoreArena(const StoreArena &) = delete;
    StoreArena & operator=(const StoreArena &) = delete;

    // the record of (key, pos) once it was admitted, else nullptr; valid for the arena's lifetime
    const uint8_t * find(uint32_t key, uint32_t pos) const {
        const Region & r = regions_[key];
        if (r.state[pos].load(std::memory_order_acquire) != kReady) {
            return nullptr;
        }
        return r.records.get() + (size_t) pos * r.record_bytes;
    }

    // Copies a record just read into its place; a record already there (or being written by another
    // thread) is left as it is. Throws std::invalid_argument for a key or position out of range.
    void admit(uint32_t key, uint32_t pos, const uint8_t * record);

    // Gives the memory of key's records back (their pages dropped, every record empty again): for records nothing
    // will look up any more. Not while another thread uses the key. Throws std::out_of_range for a bad key.
    void release(uint32_t key);
    // lookups and hits of a batch of find() calls (counted once per batch, not per call)
    void count(uint64_t lookups, uint64_t hits) {
        lookups_.fetch_add(lookups, std::memory_order_relaxed);
        hits_.fetch_add(hits, std::memory_order_relaxed);
    }

    // the bundle cache's counters: used_bytes are the state bytes and the records admitted
    CacheStats stats() const;
    void reset_stats();

private:
    static constexpr uint8_t kEmpty = 0, kWriting = 1, kReady = 2;
    // an anonymous mapping, asked for transparent huge pages: records are reached in any order, and with 4 KiB
    // pages every neuron's record costs TLB misses on top of its cache misses
    struct Mapping {
        size_t bytes; // no default member initialiser: unique_ptr needs the enclosing class complete otherwise
        void operator()(uint8_t * p) const;
    };
    struct Region {
        size_t record_bytes = 0;
        uint32_t n_records = 0;
        std::unique_ptr<uint8_t[], Mapping> records;  // untouched pages stay unallocated
        std::unique_ptr<std::atomic<uint8_t>[]> state; // kEmpty, kWriting or kReady
    };
    std::vector<Region> regions_;
    size_t capacity_ = 0;
    size_t state_bytes_ = 0;
    std::atomic<uint64_t> lookups_ { 0 }, hits_ { 0 }, admissions_ { 0 }; // since the last reset_stats()
    std::atomic<uint64_t> entries_ { 0 }, held_bytes_ { 0 };               // records held, and their bytes
};

} // namespace neuralink
