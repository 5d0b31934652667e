#pragma once

// Directory of a GGUF file: metadata and where each tensor's bytes lie.
// Parsed with ggml's own gguf reader; no tensor data is read. Only the
// scalar metadata is kept: ggml's context, which holds the tokenizer's
// arrays too (~20 MiB for a 152k vocabulary), is freed once read.

#include "ggml.h"

#include <cstdint>
#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace neuralink {

struct TensorInfo {
    std::string name;
    ggml_type   type;
    int         n_dims;
    int64_t     ne[4];
    uint64_t    offset; // absolute offset of the data in the file
    uint64_t    nbytes;
};

// The GGUF name of layer il's tensor: layer_tensor(3, "ffn_down", "weight") is "blk.3.ffn_down.weight".
std::string layer_tensor(int il, const char * base, const char * suffix);

class GgufModel {
public:
    // Throws std::runtime_error naming the file when it is missing, not a GGUF
    // file, or truncated (a tensor's data extends past the end of the file).
    explicit GgufModel(const std::string & path);
    GgufModel(const GgufModel &) = delete;
    GgufModel & operator=(const GgufModel &) = delete;

    const std::string & path() const { return path_; }
    const std::string & architecture() const { return arch_; }
    uint64_t file_size() const { return file_size_; }
    // where the data section starts: the bytes before it are the header (metadata and tensor infos)
    uint64_t data_offset() const { return data_offset_; }
    const std::vector<TensorInfo> & tensors() const { return tensors_; }

    const TensorInfo * find(const std::string & name) const;
    const TensorInfo & require(const std::string & name) const;

    // metadata values; `fallback` when the key is absent (throws when present with another type)
    std::string get_string(const std::string & key, const std::string & fallback = "") const;
    int64_t     get_int(const std::string & key, int64_t fallback) const;

private:
    std::string path_;
    std::string arch_;
    uint64_t    file_size_ = 0;
    uint64_t    data_offset_ = 0;
    struct Value {
        enum Kind { String, Integer, Other } kind = Other;
        std::string text;
        int64_t integer = 0;
    };
    std::unordered_map<std::string, Value> metadata_; // every key; arrays, floats and booleans as Other
    std::vector<TensorInfo> tensors_;
    std::unordered_map<std::string, size_t> by_name_;
};

// Where an array of `count` GGUF strings (each a little-endian u64 length, then its bytes) that starts at
// `offset` of data[0, size) ends, walked without decoding; size + 1 when a length runs past the end (the
// Python directory reader walks such an array again itself to name what is truncated where).
uint64_t gguf_strings_end(const uint8_t * data, uint64_t size, uint64_t offset, uint64_t count);

} // namespace neuralink
