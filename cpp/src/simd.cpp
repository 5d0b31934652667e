#include "simd.h"

#include <cstdlib>
#include <string>

namespace neuralink {

SimdLevel simd_level() {
    static const SimdLevel chosen = [] {
        const char * asked = std::getenv("NEURALINK_KERNELS");
        const std::string narrower = asked ? asked : "";
#ifdef NL_X86_VERSIONS
        __builtin_cpu_init();
        if (narrower.empty() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("fma")) {
            return SimdLevel::Avx512;
        }
        if (narrower != "generic" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
            return SimdLevel::Avx2;
        }
#endif
        return SimdLevel::Generic;
    }();
    return chosen;
}

} // namespace neuralink
