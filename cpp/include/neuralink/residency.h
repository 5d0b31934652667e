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
LockedPages lock_every_token_weights(const GgufModel & model);

} // namespace neuralink
