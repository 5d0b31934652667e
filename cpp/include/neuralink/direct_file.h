#pragma once

// Reading files around the page cache: O_DIRECT with aligned buffers, and a
// buffered fallback where the filesystem refuses direct I/O.

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

namespace neuralink {

// Offset, length and memory alignment used for direct reads. 4 KiB covers
// the logical block size of the devices we target (UFS, NVMe, virtio).
constexpr size_t kDirectAlign = 4096;

// v rounded down and up to a multiple of a (a > 0): the one rounding rule of reads, buffers and slots
constexpr uint64_t align_down(uint64_t v, uint64_t a) { return v / a * a; }
constexpr uint64_t align_up(uint64_t v, uint64_t a) { return (v + a - 1) / a * a; }

// Memory for reads and records, aligned for direct I/O. From kMappedBufferBytes up a buffer is a mapping of its
// own, returned to the system when it is freed, whatever malloc's thresholds: through malloc, freeing a large
// buffer (the gate rows a budget streams instead, 7.7 MiB a layer on Qwen2.5-Coder-1.5B) raised glibc's mmap
// threshold to its size, and the engine's growing read buffers then came from the threads' malloc arenas, which
// kept what they freed: under a 389.5 MiB budget neuralink-run reached 443 MiB resident, 381 with mappings
// (memory_plan.h's fix_malloc_thresholds covers the rest of the process).
class AlignedBuffer {
public:
    AlignedBuffer() = default;
    AlignedBuffer(size_t size, size_t alignment = kDirectAlign);

    uint8_t *       data()       { return ptr_.get(); }
    const uint8_t * data() const { return ptr_.get(); }
    size_t          size() const { return size_; }

private:
    struct Free {
        Free() noexcept : mapped(0) {}
        explicit Free(size_t bytes) noexcept : mapped(bytes) {}
        size_t mapped; // bytes of the mapping, 0 when the buffer came from malloc
        void operator()(uint8_t * p) const;
    };
    std::unique_ptr<uint8_t, Free> ptr_;
    size_t size_ = 0;
};

constexpr size_t kMappedBufferBytes = (size_t) 256 << 10;

constexpr size_t kHugePage = (size_t) 2 << 20;

// Asks the kernel to back the buffer's whole 2 MiB pages with huge pages (transparent huge pages in "madvise"
// mode, the usual default, need the advice), never past the buffer's end, so the memory it holds stays its
// size; a buffer not aligned to 2 MiB is left alone. Before the buffer is written: a page is backed then.
void advise_huge_pages(AlignedBuffer & buf);

class DirectFile {
public:
    // Opens `path` read-only, with O_DIRECT when `direct` is set and allowed.
    // Throws std::runtime_error naming the file when it cannot be opened.
    DirectFile(const std::string & path, bool direct);
    ~DirectFile();

    DirectFile(const DirectFile &) = delete;
    DirectFile & operator=(const DirectFile &) = delete;

    const std::string & path() const { return path_; }
    int fd() const { return fd_; }
    uint64_t size() const { return size_; }
    bool direct() const { return direct_; }
    // why direct I/O is not in use (empty when it is, or was not asked for)
    const std::string & note() const { return note_; }

    // Reads exactly [offset, offset + len) into dst. When direct(), all three
    // must be aligned to kDirectAlign, except that len may run past the end of
    // the file by less than one block. Throws on I/O errors and short reads.
    void read_exact(uint64_t offset, void * dst, size_t len) const;

    // Reads an arbitrary byte range into a fresh aligned buffer; *start points
    // at the first requested byte inside it. With `huge_pages`, a buffer of 2 MiB
    // or more is aligned to 2 MiB and its whole 2 MiB pages are asked to be huge
    // (advise_huge_pages) before the read: for weights streamed every token.
    AlignedBuffer read_range(uint64_t offset, size_t len, const uint8_t ** start, bool huge_pages = false) const;

private:
    std::string path_;
    int         fd_     = -1;
    uint64_t    size_   = 0;
    bool        direct_ = false;
    std::string note_;
};

// What every read path says when a read fails or comes back short.
std::string read_error_message(const DirectFile & file, uint64_t offset, uint64_t length, const std::string & why);
std::string short_read_message(const DirectFile & file, uint64_t offset, uint64_t length, uint64_t got);

// Fraction of the pages of [offset, offset + len) of a file that are in the
// page cache (mincore over a fresh mapping, which itself faults nothing in).
double resident_fraction(const std::string & path, uint64_t offset, uint64_t len);

// Drops the file's clean pages from the page cache (posix_fadvise DONTNEED).
void evict_from_page_cache(const std::string & path);

} // namespace neuralink
