#include "neuralink/residency.h"

#include "neuralink/direct_file.h"
#include "neuralink/file_read_ahead.h"
#include "neuralink/owned_fd.h"

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <limits.h>
#include <sys/mman.h>
#include <unistd.h>
#include <vector>

namespace neuralink {

static bool ends_with(const std::string & s, const std::string & suffix) {
    return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool read_every_token(const GgufModel & model, const TensorInfo & t) {
    for (const char * ffn : { ".ffn_gate.weight", ".ffn_up.weight", ".ffn_down.weight" }) {
        if (ends_with(t.name, ffn)) return false;
    }
    if (t.name == "token_embd.weight") {
        return model.find("output.weight") == nullptr; // tied: it is the output matrix too
    }
    return true;
}

namespace {

struct Mapping {
    uintptr_t start = 0, end = 0;
    uint64_t file_offset = 0;
};

// this process's mappings of `path` (by device and inode, so any name of the file matches)
std::vector<Mapping> mappings_of(const std::string & path) {
    std::vector<Mapping> out;
    char real[PATH_MAX];
    if (!realpath(path.c_str(), real)) return out;
    FILE * f = std::fopen("/proc/self/maps", "r");
    if (!f) return out;
    char line[PATH_MAX + 256];
    while (std::fgets(line, sizeof(line), f)) {
        unsigned long start = 0, end = 0;
        unsigned long long offset = 0;
        char perms[8] = {};
        int name_at = 0;
        if (std::sscanf(line, "%lx-%lx %7s %llx %*s %*s %n", &start, &end, perms, &offset, &name_at) < 4 || name_at == 0) {
            continue;
        }
        std::string name(line + name_at);
        while (!name.empty() && (name.back() == '\n' || name.back() == ' ')) name.pop_back();
        if (name != real || perms[0] != 'r') continue;
        // one mapping may show as several areas (locking or advising part of it splits its area): where they
        // continue each other in memory and in the file, they are one mapping, and a tensor may span them
        if (!out.empty() && out.back().end == start && out.back().file_offset + (out.back().end - out.back().start) == offset) {
            out.back().end = end;
        } else {
            out.push_back(Mapping { start, end, offset });
        }
    }
    std::fclose(f);
    return out;
}

// the mapping holding all of tensor t's bytes, or null
const Mapping * mapping_holding(const std::vector<Mapping> & maps, const TensorInfo & t) {
    const auto m = std::find_if(maps.begin(), maps.end(), [&](const Mapping & m) {
        return t.offset >= m.file_offset && t.offset + t.nbytes <= m.file_offset + (m.end - m.start);
    });
    return m == maps.end() ? nullptr : &*m;
}

const TensorInfo * untied_embedding(const GgufModel & model) {
    const TensorInfo * t = model.find("token_embd.weight");
    return t && !read_every_token(model, *t) ? t : nullptr;
}

} // namespace

// mlock faults its range in a page at a time, each fault reading what the kernel's read-ahead window holds:
// Qwen2.5-Coder-1.5B's 268 MiB, evicted by a memory cap between the model check and the lock, took 2.3 s. So
// the pages are locked kLockPiece at a time, asked for (FileReadAhead) kLockAhead ahead of the piece.
constexpr uint64_t kLockPiece = 4 << 20;
constexpr uint64_t kLockAhead = 8 * kLockPiece;

LockedPages lock_every_token_weights(const GgufModel & model, const std::string & except) {
    LockedPages result;
    const std::vector<Mapping> maps = mappings_of(model.path());
    if (maps.empty()) {
        result.error = model.path() + " is not mapped by this process (llama.cpp loaded it without mmap?)";
        return result;
    }
    const uintptr_t page = (uintptr_t) sysconf(_SC_PAGESIZE);
    // each tensor's whole pages in its mapping, and where they lie in the file
    struct Pages { const TensorInfo * tensor; uintptr_t first, last; };
    std::vector<Pages> tensors;
    std::vector<FileRange> in_file;
    for (const TensorInfo & t : model.tensors()) {
        if (!read_every_token(model, t) || t.nbytes == 0 || t.name == except) continue;
        const Mapping * m = mapping_holding(maps, t);
        if (!m) {
            result.error = "tensor '" + t.name + "' lies outside this process's mappings of " + model.path();
            return result;
        }
        const uintptr_t first = (uintptr_t) align_down(m->start + (t.offset - m->file_offset), page);
        const uintptr_t last = (uintptr_t) align_up(m->start + (t.offset - m->file_offset) + t.nbytes, page);
        tensors.push_back({ &t, first, last });
        in_file.push_back({ m->file_offset + (first - m->start), last - first });
    }
    // (a file that cannot be opened again only loses the read-ahead: the faults read the pages as before)
    const OwnedFd file(::open(model.path().c_str(), O_RDONLY | O_CLOEXEC));
    FileReadAhead ahead(file.fd, std::move(in_file), kLockAhead, kLockPiece);
    for (const Pages & p : tensors) {
        for (uintptr_t at = p.first; at < p.last; at += kLockPiece) {
            const uintptr_t end = std::min<uintptr_t>(p.last, at + kLockPiece);
            ahead.consumed(result.bytes);
            if (mlock((const void *) at, end - at) != 0) {
                const int err = errno;
                result.error = std::string("mlock of tensor '") + p.tensor->name + "' failed: " +
                               std::strerror(err) +
                               (err == ENOMEM || err == EPERM ? " (the locked-memory limit, ulimit -l, is too low)"
                                                              : "");
                return result;
            }
            result.bytes += end - at;
        }
    }
    return result;
}

constexpr uint64_t kFaultAround = 64 << 10; // the kernel's fault_around_bytes default

uint64_t lookup_mapped_bytes(uint64_t row_bytes, uint64_t page) {
    return align_up(row_bytes, page) + page + 2 * kFaultAround;
}

LookupPages bound_lookup_pages(const GgufModel & model) {
    LookupPages result;
    const TensorInfo * t = untied_embedding(model);
    if (!t || t->nbytes == 0) return result;
    const std::vector<Mapping> maps = mappings_of(model.path());
    const Mapping * m = mapping_holding(maps, *t);
    if (!m) {
        result.error = "tensor '" + t->name + "' lies outside this process's mappings of " + model.path();
        return result;
    }
    // whole pages only: the pages it shares with its neighbours may be locked (MADV_DONTNEED refuses those)
    const uint64_t page = (uint64_t) sysconf(_SC_PAGESIZE);
    const uintptr_t begin = m->start + (uintptr_t) (t->offset - m->file_offset);
    const uintptr_t first = (uintptr_t) align_up(begin, page);
    const uintptr_t last = (uintptr_t) align_down(begin + t->nbytes, page);
    if (last <= first) return result;
    if (madvise((void *) first, last - first, MADV_RANDOM) != 0) {
        result.error = std::string("madvise(MADV_RANDOM) of tensor '") + t->name + "' failed: " + std::strerror(errno);
        return result;
    }
    result.start = first;
    result.bytes = last - first;
    release_lookup_pages(result);
    // the page cache's copy may be in large folios that a fault maps whole: drop it where nothing maps it
    const int fd = open(model.path().c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        const uint64_t offset = m->file_offset + (first - m->start);
        (void) posix_fadvise(fd, (off_t) offset, (off_t) result.bytes, POSIX_FADV_DONTNEED);
        close(fd);
    }
    return result;
}

void release_lookup_pages(const LookupPages & pages) {
    if (pages.bytes) (void) madvise((void *) pages.start, pages.bytes, MADV_DONTNEED);
}

} // namespace neuralink
