#include "neuralink/weight_types.h"

#include "neuralink/kquant_dots.h"

#include <array>
#include <cstring>
#include <mutex>
#include <stdexcept>

namespace neuralink {

// ggml has no to_float for F32 itself
static void f32_to_float(const void * x, float * y, int64_t n) {
    std::memcpy(y, x, (size_t) n * sizeof(float));
}

static ggml_to_float_t to_float_of(ggml_type type) {
    return type == GGML_TYPE_F32 ? f32_to_float : ggml_get_type_traits(type)->to_float;
}

void init_ggml_cpu() {
    static std::once_flag once;
    std::call_once(once, [] { ggml_cpu_init(); });
}

bool weight_type_supported(ggml_type type, std::string * why) {
    auto fail = [&](const std::string & reason) {
        if (why) {
            *why = reason;
        }
        return false;
    };
    if ((int) type < 0 || (int) type >= GGML_TYPE_COUNT) {
        return fail("unknown ggml type " + std::to_string((int) type));
    }
    const ggml_type_traits * base = ggml_get_type_traits(type);
    const ggml_type_traits_cpu * cpu = ggml_get_type_traits_cpu(type);
    if (base->blck_size == 0 || base->type_size == 0) {
        return fail(std::string("type ") + ggml_type_name(type) + " has been removed from ggml");
    }
    if (!cpu->vec_dot || !to_float_of(type)) {
        return fail(std::string("ggml has no CPU dot product or dequantization for ") + ggml_type_name(type));
    }
    if (!ggml_get_type_traits_cpu(cpu->vec_dot_type)->from_float) {
        return fail(std::string("ggml cannot convert activations to ") + ggml_type_name(cpu->vec_dot_type));
    }
    return true;
}

const WeightType & weight_type(ggml_type type) {
    static std::array<WeightType, GGML_TYPE_COUNT> table;
    static std::array<bool, GGML_TYPE_COUNT> ready {};
    static std::mutex mutex;

    std::string why;
    if (!weight_type_supported(type, &why)) {
        throw std::invalid_argument("unsupported weight type: " + why);
    }
    std::lock_guard<std::mutex> lock(mutex);
    if (!ready[type]) {
        init_ggml_cpu();
        const ggml_type_traits * base = ggml_get_type_traits(type);
        const ggml_type_traits_cpu * cpu = ggml_get_type_traits_cpu(type);
        WeightType & w = table[type];
        w.type           = type;
        w.vec_dot_type   = cpu->vec_dot_type;
        w.block_size     = base->blck_size;
        w.to_float       = to_float_of(type);
        w.from_float     = cpu->from_float;
        w.act_from_float = ggml_get_type_traits_cpu(cpu->vec_dot_type)->from_float;
        const ggml_vec_dot_t faster = faster_vec_dot(type);
        w.vec_dot        = faster ? faster : cpu->vec_dot;
        ready[type] = true;
    }
    return table[type];
}

ggml_type type_from_name(const std::string & name) {
    for (int t = 0; t < GGML_TYPE_COUNT; ++t) {
        const ggml_type_traits * tr = ggml_get_type_traits((ggml_type) t);
        if (tr->type_name && tr->blck_size > 0 && name == tr->type_name) {
            return (ggml_type) t;
        }
    }
    throw std::invalid_argument("unknown ggml type '" + name + "'");
}

void quantize_rows(ggml_type type, const float * src, void * dst, int64_t rows, int64_t cols) {
    if (cols % ggml_blck_size(type) != 0) {
        throw std::invalid_argument(std::string("rows of ") + std::to_string(cols) + " values do not fit " +
                ggml_type_name(type) + " blocks of " + std::to_string(ggml_blck_size(type)));
    }
    if (ggml_quantize_requires_imatrix(type)) {
        throw std::invalid_argument(std::string(ggml_type_name(type)) + " needs an importance matrix to quantize");
    }
    init_ggml_cpu();
    ggml_quantize_chunk(type, src, dst, 0, rows, cols, nullptr);
}

void dequantize_rows(ggml_type type, const void * src, float * dst, int64_t rows, int64_t cols) {
    const WeightType & wt = weight_type(type);
    const size_t rb = wt.row_bytes(cols);
    for (int64_t r = 0; r < rows; ++r) {
        wt.to_float((const uint8_t *) src + r * rb, dst + r * cols, cols);
    }
}

} // namespace neuralink
