#include "neuralink/model_integrity.h"

#include "neuralink/checksum.h"
#include "neuralink/errors.h"
#include "neuralink/gguf_model.h"

#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <memory>
#include <unistd.h>
#include <vector>

namespace neuralink {

namespace {

struct Fd {
    int fd = -1;
    ~Fd() { if (fd >= 0) ::close(fd); }
};

constexpr size_t kPiece = 256 * kChecksumBlock; // 1 MiB per read

} // namespace

uint64_t file_block_checksum(const std::string & path, uint64_t offset, uint64_t nbytes) {
    Fd f;
    f.fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (f.fd < 0) {
        throw ModelFileError(path + ": cannot open: " + std::strerror(errno));
    }
    std::vector<uint8_t> piece(kPiece);
    std::vector<uint64_t> blocks;
    blocks.reserve((size_t) (nbytes / kChecksumBlock + 1));
    for (uint64_t done = 0; done < nbytes;) {
        const size_t want = (size_t) std::min<uint64_t>(kPiece, nbytes - done);
        size_t got = 0;
        while (got < want) {
            const ssize_t n = ::pread(f.fd, piece.data() + got, want - got, (off_t) (offset + done + got));
            if (n < 0 && errno == EINTR) continue;
            if (n < 0) throw ModelFileError(path + ": read failed: " + std::strerror(errno));
            if (n == 0) {
                throw ModelFileError(path + ": ends at byte " + std::to_string(offset + done + got) + ", before " +
                                     std::to_string(offset + nbytes) + ": the file is truncated");
            }
            got += (size_t) n;
        }
        for (size_t at = 0; at < want; at += kChecksumBlock) {
            blocks.push_back(checksum64(piece.data() + at, std::min(kChecksumBlock, want - at)));
        }
        done += want;
    }
    // block_checksum64's definition, over blocks read piece by piece
    return checksum64(blocks.data(), blocks.size() * sizeof(uint64_t));
}

uint64_t verify_model_file(const std::string & gguf_path, const SidecarStore & store) {
    uint64_t checked = 0;
    std::unique_ptr<GgufModel> directory; // parsed once the header range passed
    for (size_t i = 0; i < store.model_ranges().size(); ++i) {
        const ModelRange & range = store.model_ranges()[i];
        if (file_block_checksum(gguf_path, range.offset, range.nbytes) == range.checksum) {
            checked += range.nbytes;
            if (i == 0) directory = std::make_unique<GgufModel>(gguf_path);
            continue;
        }
        std::string what = "its header (metadata and tensor directory)";
        if (i > 0 && directory) {
            what = "the tensor data at byte " + std::to_string(range.offset);
            for (const TensorInfo & t : directory->tensors()) {
                if (t.offset == range.offset) what = "tensor '" + t.name + "'";
            }
        }
        throw ModelFileError(gguf_path + ": " + what + " does not match the checksum " + store.path() +
                             " recorded at conversion: the model file is corrupt or changed since (convert it "
                             "again)");
    }
    return checked;
}

} // namespace neuralink
