#include "neuralink/store_arena.h"

#include <sys/mman.h>

#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

namespace neuralink {

void StoreArena::Mapping::operator()(uint8_t * p) const {
    if (p) munmap(p, bytes);
}

// The records of one key, in an anonymous mapping that the kernel backs with 2 MiB pages where it can
// (transparent huge pages in "madvise" mode, the usual default, need the advice). A page, huge or not, is only
// backed once written, and never beyond the mapping: the arena's bytes stay what bytes_for says, rounded up to a
// page.
static uint8_t * map_records(size_t bytes) {
    void * p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        throw std::bad_alloc();
    }
#ifdef MADV_HUGEPAGE
    madvise(p, bytes, MADV_HUGEPAGE); // advice only: without THP the pages stay 4 KiB
#endif
    return (uint8_t *) p;
}

size_t StoreArena::bytes_for(const std::vector<size_t> & record_bytes, size_t records_per_key) {
    size_t bytes = 0;
    for (size_t b : record_bytes) {
        bytes += (b + 1) * records_per_key;
    }
    return bytes;
}

StoreArena::StoreArena(std::vector<size_t> record_bytes, size_t records_per_key, size_t capacity_bytes)
    : capacity_(capacity_bytes) {
    if (record_bytes.empty() || records_per_key == 0 || records_per_key > UINT32_MAX) {
        throw std::invalid_argument("a store arena needs at least one key and one record per key");
    }
    for (size_t k = 0; k < record_bytes.size(); ++k) {
        if (record_bytes[k] == 0) {
            throw std::invalid_argument("record_bytes[" + std::to_string(k) + "] is 0");
        }
        Region r;
        r.record_bytes = record_bytes[k];
        r.n_records = (uint32_t) records_per_key;
        const size_t bytes = record_bytes[k] * records_per_key;
        r.records = std::unique_ptr<uint8_t[], Mapping>(map_records(bytes), Mapping { bytes });
        r.state.reset(new std::atomic<uint8_t>[records_per_key]);
        for (size_t p = 0; p < records_per_key; ++p) r.state[p].store(kEmpty, std::memory_order_relaxed);
        state_bytes_ += records_per_key;
        regions_.push_back(std::move(r));
    }
}

void StoreArena::release(uint32_t key) {
    Region & r = regions_.at(key);
    uint64_t records = 0;
    for (uint32_t p = 0; p < r.n_records; ++p) {
        if (r.state[p].exchange(kEmpty, std::memory_order_acq_rel) == kReady) ++records;
    }
    madvise(r.records.get(), r.record_bytes * r.n_records, MADV_DONTNEED); // the mapping stays, its pages go
    entries_.fetch_sub(records, std::memory_order_relaxed);
    held_bytes_.fetch_sub(records * r.record_bytes, std::memory_order_relaxed);
}

void StoreArena::admit(uint32_t key, uint32_t pos, const uint8_t * record) {
    if (key >= regions_.size() || pos >= regions_[key].n_records) {
        throw std::invalid_argument("store arena: record (" + std::to_string(key) + ", " + std::to_string(pos) +
                                    ") is out of range");
    }
    Region & r = regions_[key];
    uint8_t expected = kEmpty;
    if (!r.state[pos].compare_exchange_strong(expected, kWriting, std::memory_order_acquire)) {
        return;
    }
    std::memcpy(r.records.get() + (size_t) pos * r.record_bytes, record, r.record_bytes);
    r.state[pos].store(kReady, std::memory_order_release);
    admissions_.fetch_add(1, std::memory_order_relaxed);
    entries_.fetch_add(1, std::memory_order_relaxed);
    held_bytes_.fetch_add(r.record_bytes, std::memory_order_relaxed);
}

CacheStats StoreArena::stats() const {
    CacheStats s;
    s.lookups = lookups_.load(std::memory_order_relaxed);
    s.hits = hits_.load(std::memory_order_relaxed);
    s.admissions = admissions_.load(std::memory_order_relaxed);
    s.table_bytes = state_bytes_;
    s.used_bytes = state_bytes_ + held_bytes_.load(std::memory_order_relaxed);
    s.capacity_bytes = capacity_;
    s.entries = entries_.load(std::memory_order_relaxed);
    return s;
}

void StoreArena::reset_stats() {
    lookups_.store(0, std::memory_order_relaxed);
    hits_.store(0, std::memory_order_relaxed);
    admissions_.store(0, std::memory_order_relaxed);
}

} // namespace neuralink
