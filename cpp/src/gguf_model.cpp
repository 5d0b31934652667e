#include "neuralink/gguf_model.h"

#include "neuralink/errors.h"

#include "gguf.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <sys/stat.h>

namespace neuralink {

std::string layer_tensor(int il, const char * base, const char * suffix) {
    char buf[96];
    std::snprintf(buf, sizeof(buf), "blk.%d.%s.%s", il, base, suffix);
    return buf;
}

GgufModel::GgufModel(const std::string & path) : path_(path) {
    struct stat st {};
    if (stat(path.c_str(), &st) != 0) {
        throw ModelFileError(path + ": cannot open: " + std::strerror(errno));
    }
    if (!S_ISREG(st.st_mode)) {
        throw ModelFileError(path + ": not a regular file");
    }
    file_size_ = (uint64_t) st.st_size;

    ggml_context * meta = nullptr;
    gguf_init_params params = { /*.no_alloc =*/ true, /*.ctx =*/ &meta };
    gguf_context * gguf = gguf_init_from_file(path.c_str(), params);
    if (gguf == nullptr) {
        throw ModelFileError(path + ": not a valid GGUF file (bad magic or version, or a truncated or corrupt header)");
    }

    const int64_t n = gguf_get_n_tensors(gguf);
    const uint64_t data_offset = gguf_get_data_offset(gguf);
    data_offset_ = data_offset;
    tensors_.reserve((size_t) n);
    for (int64_t i = 0; i < n; ++i) {
        const char * name = gguf_get_tensor_name(gguf, i);
        const ggml_tensor * t = ggml_get_tensor(meta, name);
        TensorInfo info;
        info.name   = name;
        info.type   = gguf_get_tensor_type(gguf, i);
        info.n_dims = ggml_n_dims(t);
        for (int d = 0; d < 4; ++d) {
            info.ne[d] = t->ne[d];
        }
        info.offset = data_offset + gguf_get_tensor_offset(gguf, i);
        info.nbytes = gguf_get_tensor_size(gguf, i);
        if (info.offset + info.nbytes > file_size_) {
            ggml_free(meta);
            gguf_free(gguf);
            throw ModelFileError(path + ": tensor '" + info.name + "' data [" + std::to_string(info.offset) + ", " +
                    std::to_string(info.offset + info.nbytes) + ") lies beyond the end of the file (" +
                    std::to_string(file_size_) + " bytes): truncated file?");
        }
        by_name_[info.name] = tensors_.size();
        tensors_.push_back(std::move(info));
    }
    ggml_free(meta);

    for (int64_t id = 0; id < gguf_get_n_kv(gguf); ++id) {
        Value v;
        switch (gguf_get_kv_type(gguf, id)) {
            case GGUF_TYPE_STRING: v.kind = Value::String; v.text = gguf_get_val_str(gguf, id); break;
            case GGUF_TYPE_UINT8:  v.kind = Value::Integer; v.integer = gguf_get_val_u8(gguf, id); break;
            case GGUF_TYPE_INT8:   v.kind = Value::Integer; v.integer = gguf_get_val_i8(gguf, id); break;
            case GGUF_TYPE_UINT16: v.kind = Value::Integer; v.integer = gguf_get_val_u16(gguf, id); break;
            case GGUF_TYPE_INT16:  v.kind = Value::Integer; v.integer = gguf_get_val_i16(gguf, id); break;
            case GGUF_TYPE_UINT32: v.kind = Value::Integer; v.integer = gguf_get_val_u32(gguf, id); break;
            case GGUF_TYPE_INT32:  v.kind = Value::Integer; v.integer = gguf_get_val_i32(gguf, id); break;
            case GGUF_TYPE_UINT64: v.kind = Value::Integer; v.integer = (int64_t) gguf_get_val_u64(gguf, id); break;
            case GGUF_TYPE_INT64:  v.kind = Value::Integer; v.integer = gguf_get_val_i64(gguf, id); break;
            default: break; // arrays (the tokenizer's), floats, booleans: not asked for, not kept
        }
        metadata_.emplace(gguf_get_key(gguf, id), std::move(v));
    }
    gguf_free(gguf);

    arch_ = get_string("general.architecture");
    if (arch_.empty()) {
        throw ModelFileError(path + ": GGUF metadata has no general.architecture");
    }
}

const TensorInfo * GgufModel::find(const std::string & name) const {
    const auto it = by_name_.find(name);
    return it == by_name_.end() ? nullptr : &tensors_[it->second];
}

const TensorInfo & GgufModel::require(const std::string & name) const {
    const TensorInfo * t = find(name);
    if (!t) {
        throw ModelFileError(path_ + ": tensor '" + name + "' not found");
    }
    return *t;
}

std::string GgufModel::get_string(const std::string & key, const std::string & fallback) const {
    const auto it = metadata_.find(key);
    if (it == metadata_.end()) {
        return fallback;
    }
    if (it->second.kind != Value::String) {
        throw ModelFileError(path_ + ": metadata key '" + key + "' is not a string");
    }
    return it->second.text;
}

int64_t GgufModel::get_int(const std::string & key, int64_t fallback) const {
    const auto it = metadata_.find(key);
    if (it == metadata_.end()) {
        return fallback;
    }
    if (it->second.kind != Value::Integer) {
        throw ModelFileError(path_ + ": metadata key '" + key + "' is not an integer");
    }
    return it->second.integer;
}

uint64_t gguf_strings_end(const uint8_t * data, uint64_t size, uint64_t offset, uint64_t count) {
    uint64_t at = offset;
    for (uint64_t i = 0; i < count; ++i) {
        uint64_t n;
        if (at > size || size - at < sizeof n) return size + 1;
        std::memcpy(&n, data + at, sizeof n); // GGUF is little-endian, as every target here
        at += sizeof n;
        if (n > size - at) return size + 1;
        at += n;
    }
    return at;
}

} // namespace neuralink
