#pragma once

// Sizes as people write them: "120MB", "1.5GiB", "512M", "4096". One rule for
// every front end (neuralink-run's options; neuralink's Python package through
// the bindings): K, M, G and KiB, MiB, GiB are binary (1024^n); kB, MB, GB are
// decimal (1000^n); units are case-insensitive, B or none means bytes.

#include <cstdint>
#include <string>

namespace neuralink {

// Bytes in `text`; std::invalid_argument "cannot read <what> 'text': <reason>" when it is not a
// positive size of at least one byte with a known unit.
uint64_t parse_size(const std::string & text, const std::string & what = "size");

} // namespace neuralink
