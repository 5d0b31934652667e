#include "neuralink/direct_file.h"

#include "neuralink/errors.h"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fcntl.h>
#include <stdexcept>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

namespace neuralink {

static std::string errno_text(int err) {
    return std::strerror(err);
}

void AlignedBuffer::Free::operator()(uint8_t * p) const {
    if (mapped) {
        munmap(p, mapped);
    } else {
        std::free(p);
    }
}

AlignedBuffer::AlignedBuffer(size_t size, size_t alignment) : size_(size) {
    const size_t padded = std::max(align_up(size, alignment), alignment);
    const long page_size = sysconf(_SC_PAGESIZE);
    const size_t page = page_size > 0 ? (size_t) page_size : 4096;
    if (padded >= kMappedBufferBytes) {
        // a mapping of its own: map `alignment` more, then unmap what lies before and after the aligned range
        const size_t length = align_up(padded, page);
        const size_t extra = alignment > page ? alignment : 0;
        void * m = mmap(nullptr, length + extra, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED) {
            throw std::bad_alloc();
        }
        uint8_t * base = (uint8_t *) m;
        uint8_t * aligned = (uint8_t *) align_up((uintptr_t) base, alignment);
        if (aligned > base) munmap(base, (size_t) (aligned - base));
        const size_t tail = (size_t) (base + length + extra - (aligned + length));
        if (tail > 0) munmap(aligned + length, tail);
        ptr_ = std::unique_ptr<uint8_t, Free>(aligned, Free(length));
        return;
    }
    void * p = nullptr;
    if (posix_memalign(&p, alignment, padded) != 0) {
        throw std::bad_alloc();
    }
    ptr_ = std::unique_ptr<uint8_t, Free>((uint8_t *) p, Free());
}

DirectFile::DirectFile(const std::string & path, bool direct) : path_(path) {
    if (direct) {
        fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT);
        if (fd_ >= 0) {
            direct_ = true;
        } else if (errno == EINVAL) {
            note_ = "the filesystem refuses O_DIRECT; reading through the page cache";
        } else {
            throw ModelFileError(path + ": cannot open: " + errno_text(errno));
        }
    }
    if (fd_ < 0) {
        fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
        if (fd_ < 0) {
            throw ModelFileError(path + ": cannot open: " + errno_text(errno));
        }
    }
    struct stat st {};
    if (fstat(fd_, &st) != 0) {
        const int err = errno;
        ::close(fd_);
        throw ModelFileError(path + ": cannot stat: " + errno_text(err));
    }
    size_ = (uint64_t) st.st_size;

    if (direct_ && size_ >= kDirectAlign) {
        // some filesystems accept O_DIRECT at open and refuse the reads
        AlignedBuffer probe(kDirectAlign);
        if (::pread(fd_, probe.data(), kDirectAlign, 0) < 0 && errno == EINVAL) {
            ::close(fd_);
            fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
            if (fd_ < 0) {
                throw ModelFileError(path + ": cannot open: " + errno_text(errno));
            }
            direct_ = false;
            note_ = "direct reads fail with EINVAL on this filesystem; reading through the page cache";
        }
    }
}

DirectFile::~DirectFile() {
    if (fd_ >= 0) {
        ::close(fd_);
    }
}

void DirectFile::read_exact(uint64_t offset, void * dst, size_t len) const {
    if (direct_ && (offset % kDirectAlign || (uintptr_t) dst % kDirectAlign || len % kDirectAlign)) {
        throw std::invalid_argument(path_ + ": unaligned direct read at offset " + std::to_string(offset) +
                " of " + std::to_string(len) + " bytes");
    }
    // a direct read may end past EOF (its last block is partial); only the bytes up to EOF are needed then
    const uint64_t need_end = direct_ ? std::min<uint64_t>(offset + len, std::max<uint64_t>(size_, offset)) : offset + len;
    uint8_t * out = (uint8_t *) dst;
    uint64_t pos = offset;
    while (pos < offset + len) {
        const ssize_t got = ::pread(fd_, out + (pos - offset), (size_t) (offset + len - pos), (off_t) pos);
        if (got < 0) {
            if (errno == EINTR) {
                continue;
            }
            throw IoError(read_error_message(*this, offset, len, errno_text(errno)));
        }
        if (got == 0) {
            break;
        }
        pos += (uint64_t) got;
    }
    if (pos < need_end) {
        throw IoError(short_read_message(*this, offset, len, pos - offset));
    }
}

void advise_huge_pages(AlignedBuffer & buf) {
#ifdef MADV_HUGEPAGE
    const size_t whole = buf.size() / kHugePage * kHugePage;
    if (whole > 0 && (uintptr_t) buf.data() % kHugePage == 0) madvise(buf.data(), whole, MADV_HUGEPAGE);
#else
    (void) buf;
#endif
}

AlignedBuffer DirectFile::read_range(uint64_t offset, size_t len, const uint8_t ** start, bool huge_pages) const {
    const uint64_t begin = direct_ ? align_down(offset, kDirectAlign) : offset;
    const uint64_t end   = direct_ ? align_up(offset + len, kDirectAlign) : offset + len;
    if (offset + len > size_) {
        throw IoError(path_ + ": range [" + std::to_string(offset) + ", " + std::to_string(offset + len) +
                ") lies beyond the end of the file (" + std::to_string(size_) + " bytes)");
    }
    const size_t bytes = (size_t) (end - begin);
    AlignedBuffer buf(bytes, huge_pages && bytes >= kHugePage ? kHugePage : kDirectAlign);
    if (huge_pages) advise_huge_pages(buf);
    read_exact(begin, buf.data(), bytes);
    *start = buf.data() + (offset - begin);
    return buf;
}

std::string read_error_message(const DirectFile & file, uint64_t offset, uint64_t length, const std::string & why) {
    return file.path() + ": read of " + std::to_string(length) + " bytes at offset " + std::to_string(offset) +
           " failed: " + why;
}

std::string short_read_message(const DirectFile & file, uint64_t offset, uint64_t length, uint64_t got) {
    return file.path() + ": short read at offset " + std::to_string(offset) + ": wanted " + std::to_string(length) +
           " bytes, got " + std::to_string(got) + " (file is " + std::to_string(file.size()) +
           " bytes: changed or truncated?)";
}

double resident_fraction(const std::string & path, uint64_t offset, uint64_t len) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        throw ModelFileError(path + ": cannot open: " + errno_text(errno));
    }
    const long page = sysconf(_SC_PAGESIZE);
    const uint64_t begin = align_down(offset, (uint64_t) page);
    const uint64_t end = align_up(offset + len, (uint64_t) page);
    if (len == 0) {
        ::close(fd);
        return 0.0;
    }
    void * addr = mmap(nullptr, end - begin, PROT_READ, MAP_SHARED, fd, (off_t) begin);
    const int map_err = errno;
    ::close(fd);
    if (addr == MAP_FAILED) {
        throw std::runtime_error(path + ": mmap failed: " + errno_text(map_err));
    }
    std::vector<unsigned char> vec((end - begin) / page);
    const int rc = mincore(addr, end - begin, vec.data());
    const int mc_err = errno;
    munmap(addr, end - begin);
    if (rc != 0) {
        throw std::runtime_error(path + ": mincore failed: " + errno_text(mc_err));
    }
    size_t resident = 0;
    for (unsigned char v : vec) {
        resident += v & 1;
    }
    return (double) resident / (double) vec.size();
}

void evict_from_page_cache(const std::string & path) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        throw ModelFileError(path + ": cannot open: " + errno_text(errno));
    }
    const int rc = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
    ::close(fd);
    if (rc != 0) {
        throw std::runtime_error(path + ": posix_fadvise(DONTNEED) failed: " + errno_text(rc));
    }
}

} // namespace neuralink
