#pragma once

// The converted GGUF checked against the sidecar: llama.cpp has no checksums of its own, so the
// conversion records block_checksum64 of the bytes llama.cpp reads from the converted GGUF (its
// header, and every tensor the sidecar does not replace) in the sidecar, and a loader verifies them
// before llama.cpp parses the file: a corrupt model is refused instead of running silently wrong.

#include "neuralink/sidecar_store.h"

#include <cstdint>
#include <string>

namespace neuralink {

// block_checksum64 of `nbytes` bytes of the file at `path` from `offset`, read in large pieces.
// Throws ModelFileError when the file cannot be read or is shorter.
uint64_t file_block_checksum(const std::string & path, uint64_t offset, uint64_t nbytes);

// Throws ModelFileError naming the file and the range (the header, or the tensor there) when a range
// of store.model_ranges() differs; returns the bytes checked (0 for a sidecar that records none).
uint64_t verify_model_file(const std::string & gguf_path, const SidecarStore & store);

} // namespace neuralink
