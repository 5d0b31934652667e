#pragma once

// Keeping what every token reads in RAM under a memory budget. llama.cpp maps
// the model file and reads the attention, norm and output tensors from that
// mapping every token; they are clean file pages, so a cgroup at its limit
// reclaims them first and the next token faults them back in (150-350 major
// faults per token measured on Qwen2.5-Coder-1.5B under 530-800 MB caps).
// Locking them (mlock) keeps them resident; the memory plan already counts them.

#include "neuralink/gguf_model.h"

#include <cstdint>
#include <string>

namespace neuralink {

// Whether tensor `t` of `model` is read whole every token by llama.cpp and not by the engine: every tensor but
// the FFN weights (gate, up, down) and, where the model has an output matrix of its own, the token embedding
// (whose rows are only looked up).
bool read_every_token(const GgufModel & model, const TensorInfo & t);

struct LockedPages {
    uint64_t bytes = 0; // bytes of pages locked
    std::string error;  // why not (all of) them, empty when all were locked
};

// Locks the pages of every tensor read_every_token selects in this process's mapping of the model file (the
// one llama.cpp made; found in /proc/self/maps). Faults them in now. Never throws: a failure (no mapping,
// RLIMIT_MEMLOCK) is reported in `error` with what was locked before it.
// `except`: a tensor left out (the output matrix an output screen stands in for), or "".
LockedPages lock_every_token_weights(const GgufModel & model, const std::string & except = "");

// An untied token embedding is only looked up, a row per token, but a lookup
// maps far more than its row: the kernel reads ahead (8 MiB on some disks)
// and maps what the page cache holds around the fault, in large folios when
// something read the file sequentially; measured on Qwen2.5-Coder-1.5B, 256
// lookups mapped 31-90 MiB of its 125 MiB table, and a long context maps it
// all. These are clean file pages (a cgroup reclaims them), yet they are RSS.
// Bounded here: the table's whole pages are advised MADV_RANDOM (no read
// ahead), dropped from the page cache where nothing else maps them, and
// unmapped again after each micro-batch's lookups (release_lookup_pages), so
// at most one micro-batch's rows are mapped at a time.
struct LookupPages {
    uintptr_t start = 0; // whole pages inside the table, in this process's mapping of the model
    size_t bytes = 0;    // 0: nothing to bound (tied embedding, or an error)
    std::string error;   // why not, empty when bounded or when there is nothing to bound
};

// Finds and advises the untied token embedding's pages (see above). Never throws.
LookupPages bound_lookup_pages(const GgufModel & model);
// Unmaps them (MADV_DONTNEED; the next lookup faults its pages back from the page cache).
void release_lookup_pages(const LookupPages & pages);
// What one looked-up row may map at most: its pages and a fault-around window (64 KiB) on each side.
uint64_t lookup_mapped_bytes(uint64_t row_bytes, uint64_t page);

} // namespace neuralink
