#pragma once

// Names of the engine's options (predictors, cache policies, I/O backends, ...):
// each enum has one table of (value, name) pairs, and these two functions are
// the only code that maps between them.

#include <cstddef>
#include <stdexcept>
#include <string>

namespace neuralink {

template <class Enum>
struct Named {
    Enum value;
    const char * name;
};

// The name of `value` in `table`, "?" for a value the table lacks.
template <class Enum, size_t N>
const char * name_in(const Named<Enum> (&table)[N], Enum value) {
    for (const Named<Enum> & n : table) {
        if (n.value == value) {
            return n.name;
        }
    }
    return "?";
}

// The value called `name`; std::invalid_argument "unknown <what> 'x' (expected one of 'a', 'b')" otherwise.
template <class Enum, size_t N>
Enum value_in(const Named<Enum> (&table)[N], const std::string & name, const char * what) {
    std::string valid;
    for (const Named<Enum> & n : table) {
        if (name == n.name) {
            return n.value;
        }
        valid += (valid.empty() ? "'" : ", '") + std::string(n.name) + "'";
    }
    throw std::invalid_argument("unknown " + std::string(what) + " '" + name + "' (expected one of " + valid + ")");
}

} // namespace neuralink
