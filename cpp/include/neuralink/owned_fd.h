#pragma once

// A file descriptor closed when its owner goes: one place that closes it, whichever way a function returns.

#include <unistd.h>

namespace neuralink {

struct OwnedFd {
    int fd = -1;
    OwnedFd() = default;
    explicit OwnedFd(int fd_) : fd(fd_) {}
    OwnedFd(OwnedFd && o) noexcept : fd(o.fd) { o.fd = -1; }
    OwnedFd(const OwnedFd &) = delete;
    OwnedFd & operator=(const OwnedFd &) = delete;
    OwnedFd & operator=(OwnedFd &&) = delete;
    ~OwnedFd() {
        if (fd >= 0) ::close(fd);
    }
};

} // namespace neuralink
