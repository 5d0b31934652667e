#include "neuralink/sizes.h"

#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <stdexcept>

namespace neuralink {

namespace {

struct Unit {
    const char * name;
    double bytes;
};

constexpr Unit kUnits[] = {
    { "", 1 }, { "b", 1 }, { "k", 1024.0 }, { "kb", 1e3 }, { "kib", 1024.0 }, { "m", 1048576.0 }, { "mb", 1e6 },
    { "mib", 1048576.0 }, { "g", 1073741824.0 }, { "gb", 1e9 }, { "gib", 1073741824.0 },
};

} // namespace

uint64_t parse_size(const std::string & text, const std::string & what) {
    const std::string head = "cannot read " + what + " '" + text + "': ";
    const char * s = text.c_str();
    char * end = nullptr;
    errno = 0;
    const double value = std::strtod(s, &end);
    if (end == s || errno != 0 || !std::isfinite(value) || value <= 0) {
        throw std::invalid_argument(head + "expected a positive number of bytes with an optional unit, e.g. 4096, "
                                    "64K, 1.5GiB or 120MB (K/M/G and KiB/MiB/GiB are binary, kB/MB/GB decimal)");
    }
    std::string unit;
    for (; *end; ++end) {
        if (!std::isspace((unsigned char) *end)) {
            unit += (char) std::tolower((unsigned char) *end);
        }
    }
    for (const Unit & u : kUnits) {
        if (unit == u.name) {
            const uint64_t bytes = (uint64_t) (value * u.bytes);
            if (bytes == 0) {
                throw std::invalid_argument(head + "less than one byte");
            }
            return bytes;
        }
    }
    throw std::invalid_argument(head + "unknown unit (expected B, K, M, G, kB, MB, GB, KiB, MiB or GiB)");
}

} // namespace neuralink
