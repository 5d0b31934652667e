#include "neuralink/file_read_ahead.h"

#include <algorithm>
#include <fcntl.h>
#include <utility>

namespace neuralink {

FileReadAhead::FileReadAhead(int fd, std::vector<FileRange> ranges, uint64_t ahead, uint64_t piece)
    : fd_(fd), ranges_(std::move(ranges)), ahead_(ahead), piece_(piece) {}

void FileReadAhead::consumed(uint64_t consumed) {
    while (fd_ >= 0 && issued_ < consumed + ahead_ && next_ < ranges_.size()) {
        const FileRange & r = ranges_[next_];
        if (r.bytes == 0) { // (a length of 0 would ask for the rest of the file)
            ++next_;
            continue;
        }
        const uint64_t len = std::min<uint64_t>(r.bytes - within_, piece_);
        ::posix_fadvise(fd_, (off_t) (r.offset + within_), (off_t) len, POSIX_FADV_WILLNEED);
        issued_ += len;
        within_ += len;
        if (within_ >= r.bytes) {
            ++next_;
            within_ = 0;
        }
    }
}

} // namespace neuralink
