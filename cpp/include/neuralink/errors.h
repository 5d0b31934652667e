#pragma once

// Error kinds the engine reports; the bindings map them to neuralink.errors.

#include <stdexcept>

namespace neuralink {

// a model or sidecar file that is missing, malformed or truncated
struct ModelFileError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// a well-formed model that neuralink does not support (architecture, FFN form)
struct UnsupportedModelError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// a read that failed or came back short at run time
struct IoError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// an FFN output holding NaN or infinity: weights corrupt beyond what the checksums see, or a numeric
// blow-up; refused instead of handed to the next layer
struct NumericError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

} // namespace neuralink
