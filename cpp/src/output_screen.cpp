#include "neuralink/output_screen.h"

#include "neuralink/errors.h"

#include <algorithm>
#include <fcntl.h>
#include <thread>

namespace neuralink {

static constexpr const char * kOutputTensor = "output.weight";
// rows read and re-encoded at a time when making the coarse copy (per thread: ~1.2 MiB read, 6 MiB of floats
// on Qwen2.5-Coder-1.5B)
static constexpr int64_t kCopyRows = 1024;

std::string OutputScreen::unsupported(const GgufModel & model, ggml_type coarse_type) {
    const TensorInfo * t = model.find(kOutputTensor);
    if (!t) {
        return "the output matrix is the token embedding (tied): it is looked up too, so it stays";
    }
    std::string why;
    if (t->n_dims != 2 || !weight_type_supported(t->type, &why)) {
        return std::string(kOutputTensor) + " (" + ggml_type_name(t->type) + "): " +
               (why.empty() ? "not a matrix" : why);
    }
    if (!weight_type_supported(coarse_type, &why)) {
        return std::string("coarse type ") + ggml_type_name(coarse_type) + ": " + why;
    }
    if (t->ne[0] % ggml_blck_size(coarse_type) != 0 || ggml_quantize_requires_imatrix(coarse_type)) {
        return std::string("rows of ") + std::to_string(t->ne[0]) + " values cannot be encoded in " +
               ggml_type_name(coarse_type);
    }
    if (weight_type(coarse_type).vec_dot_type != weight_type(t->type).vec_dot_type) {
        return std::string(ggml_type_name(coarse_type)) + " and " + ggml_type_name(t->type) +
               " multiply different activation types";
    }
    if (ggml_row_size(coarse_type, t->ne[0]) >= ggml_row_size(t->type, t->ne[0])) {
        return std::string("a ") + ggml_type_name(coarse_type) + " copy is no smaller than the " +
               ggml_type_name(t->type) + " matrix";
    }
    return "";
}

OutputScreen::OutputScreen(const GgufModel & model, const OutputScreenOptions & options)
    : options_(options) {
    init_ggml_cpu();
    if (const std::string why = unsupported(model, options.coarse_type); !why.empty()) {
        throw UnsupportedModelError(model.path() + ": no output screen: " + why);
    }
    const TensorInfo & t = model.require(kOutputTensor);
    name_ = t.name;
    exact_ = &weight_type(t.type);
    coarse_ = &weight_type(options.coarse_type);
    n_embd_ = t.ne[0];
    n_vocab_ = t.ne[1];
    offset_ = t.offset;
    matrix_bytes_ = t.nbytes;
    exact_row_bytes_ = exact_->row_bytes(n_embd_);
    coarse_row_bytes_ = coarse_->row_bytes(n_embd_);
    act_row_bytes_ = exact_->act_row_bytes(n_embd_);
    file_ = std::make_unique<DirectFile>(model.path(), false);
    // exact rows are read one at a time, wherever the coarse ranking puts them: no read-ahead around them
    (void) posix_fadvise(file_->fd(), 0, 0, POSIX_FADV_RANDOM);

    coarse_bytes_.resize(coarse_row_bytes_ * (size_t) n_vocab_);
    const int nth = std::max(1, options.n_threads);
    std::vector<std::string> errors((size_t) nth);
    auto copy_rows = [&](int ith) {
        std::vector<uint8_t> raw((size_t) kCopyRows * exact_row_bytes_);
        std::vector<float> values((size_t) (kCopyRows * n_embd_));
        // chunks of kCopyRows, dealt round-robin
        for (int64_t first = (int64_t) ith * kCopyRows; first < n_vocab_; first += (int64_t) nth * kCopyRows) {
            const int64_t rows = std::min(kCopyRows, n_vocab_ - first);
            const size_t bytes = (size_t) rows * exact_row_bytes_;
            const uint64_t at = offset_ + (uint64_t) first * exact_row_bytes_;
            try {
                file_->read_exact(at, raw.data(), bytes);
            } catch (const std::exception & e) {
                errors[(size_t) ith] = std::string(e.what()) + " (" + name_ + ", for the output screen)";
                return;
            }
            // these pages are read once: not left in the page cache a memory cap charges
            (void) posix_fadvise(file_->fd(), (off_t) at, (off_t) bytes, POSIX_FADV_DONTNEED);
            dequantize_rows(exact_->type, raw.data(), values.data(), rows, n_embd_);
            ggml_quantize_chunk(coarse_->type, values.data(), coarse_bytes_.data() + (size_t) first * coarse_row_bytes_,
                                0, rows, n_embd_, nullptr);
        }
    };
    std::vector<std::thread> workers;
    for (int ith = 1; ith < nth; ++ith) workers.emplace_back(copy_rows, ith);
    copy_rows(0);
    for (std::thread & w : workers) w.join();
    for (const std::string & e : errors) {
        if (!e.empty()) throw IoError(e);
    }
    // at most a sixteenth of the vocabulary: a cache near the matrix's size would undo the screen
    const int64_t slots = std::max<int64_t>(0, std::min(options.cached_rows, n_vocab_ / 16));
    cache_bytes_.resize((size_t) slots * exact_row_bytes_);
    cache_row_.assign((size_t) slots, -1);
    referenced_.assign((size_t) slots, 0);
    used_in_call_.assign((size_t) slots, 0);
    slot_of_.assign((size_t) n_vocab_, -1);
}

int32_t OutputScreen::cache_slot(int64_t row, bool * hit) {
    if (const int32_t s = slot_of_[(size_t) row]; s >= 0) {
        *hit = true;
        referenced_[(size_t) s] = 1;
        used_in_call_[(size_t) s] = call_;
        return s;
    }
    *hit = false;
    const size_t n = cache_row_.size();
    // CLOCK: the first slot since the hand not referenced since its last pass and not used by this call
    for (size_t step = 0; step < 2 * n; ++step) {
        const size_t s = hand_;
        hand_ = (hand_ + 1) % n;
        if (used_in_call_[s] == call_) continue;
        if (referenced_[s]) {
            referenced_[s] = 0;
            continue;
        }
        if (cache_row_[s] >= 0) slot_of_[(size_t) cache_row_[s]] = -1;
        cache_row_[s] = row;
        slot_of_[(size_t) row] = (int32_t) s;
        referenced_[s] = 1;
        used_in_call_[s] = call_;
        return (int32_t) s;
    }
    return -1;
}

uint64_t OutputScreen::scratch_bytes(int n_threads) const {
    const uint64_t tokens = (uint64_t) reserved_tokens_;
    const uint64_t threads = (uint64_t) std::max(1, n_threads);
    return threads * tokens * act_row_bytes_ + tokens * kListedRows * (sizeof(Exact) + sizeof(Read));
}

void OutputScreen::reserve(int64_t n_tokens) {
    reserved_tokens_ = std::max<int64_t>(reserved_tokens_, std::max<int64_t>(1, n_tokens));
    exact_list_.reserve((size_t) (reserved_tokens_ * kListedRows));
    reads_.reserve((size_t) (reserved_tokens_ * kListedRows));
}

void OutputScreen::read_row(int64_t row, uint8_t * dst) const {
    file_->read_exact(offset_ + (uint64_t) row * exact_row_bytes_, dst, exact_row_bytes_);
}

// the activations in the types' vec_dot_type, converted by each thread into a buffer of its own (there is no
// barrier inside a phase to share one): n_embd values a token, cheap beside the rows
const uint8_t * OutputScreen::activations(const float * x, int64_t n_tokens) const {
    thread_local std::vector<uint8_t> act;
    act.resize((size_t) n_tokens * act_row_bytes_);
    for (int64_t t = 0; t < n_tokens; ++t) {
        exact_->act_from_float(x + t * n_embd_, act.data() + (size_t) t * act_row_bytes_, n_embd_);
    }
    return act.data();
}

void OutputScreen::phase(int phase, const float * x, float * y, int64_t n_tokens, int ith, int nth) {
    if (phase == 0) {
        // the coarse logits, the rows split over the threads
        const uint8_t * act = activations(x, n_tokens);
        const int64_t per = (n_vocab_ + nth - 1) / nth;
        const int64_t first = std::min<int64_t>((int64_t) ith * per, n_vocab_);
        const int64_t last = std::min<int64_t>(first + per, n_vocab_);
        for (int64_t t = 0; t < n_tokens; ++t) {
            const uint8_t * a = act + (size_t) t * act_row_bytes_;
            float * out = y + t * n_vocab_;
            for (int64_t r = first; r < last; ++r) {
                coarse_->vec_dot((int) n_embd_, out + r, 0, coarse_bytes_.data() + (size_t) r * coarse_row_bytes_,
                                 0, a, 0, 1);
            }
        }
        return;
    }
    if (phase == 1) {
        if (ith == 0) list_exact_rows(y, n_tokens);
        return;
    }
    if (phase == 2) {
        // the rows not in the cache, dealt round-robin (the kernel was asked for all of them in phase 1)
        for (size_t k = (size_t) ith; k < reads_.size(); k += (size_t) nth) {
            try {
                read_row(reads_[k].row, slot_bytes(reads_[k].slot));
            } catch (const std::exception & err) {
                std::lock_guard<std::mutex> lock(error_mutex_);
                if (error_.empty()) error_ = err.what();
                return;
            }
        }
        return;
    }
    // phase 3: the listed rows multiplied as llama.cpp multiplies them, dealt round-robin
    if (!error().empty()) return; // a row missing: the coarse logits stay, and the caller is told
    const uint8_t * act = activations(x, n_tokens);
    for (size_t k = (size_t) ith; k < exact_list_.size(); k += (size_t) nth) {
        const Exact & e = exact_list_[k];
        exact_->vec_dot((int) n_embd_, y + e.token * n_vocab_ + e.row, 0, slot_bytes(e.slot), 0,
                        act + (size_t) e.token * act_row_bytes_, 0, 1);
    }
}

uint8_t * OutputScreen::slot_bytes(int64_t slot) {
    const int64_t cached = (int64_t) cache_row_.size();
    return slot < cached ? cache_bytes_.data() + (size_t) slot * exact_row_bytes_
                         : overflow_bytes_.data() + (size_t) (slot - cached) * exact_row_bytes_;
}

void OutputScreen::list_exact_rows(const float * y, int64_t n_tokens) {
    exact_list_.clear();
    reads_.clear();
    ++call_;
    const int64_t cached = (int64_t) cache_row_.size();
    int64_t overflow = 0; // rows of this call beyond the cache's slots, read into overflow_bytes_
    for (int64_t t = 0; t < n_tokens; ++t) {
        const float * logits = y + t * n_vocab_;
        const float floor = *std::max_element(logits, logits + n_vocab_) - options_.margin;
        const size_t before = exact_list_.size();
        for (int64_t r = 0; r < n_vocab_; ++r) {
            if (logits[r] < floor) continue;
            bool hit = false;
            int64_t slot = cache_row_.empty() ? -1 : cache_slot(r, &hit);
            if (slot < 0) slot = cached + overflow++;
            if (!hit) {
                reads_.push_back({ r, slot });
                // the kernel reads every missing row at once, while this thread lists the rest
                (void) posix_fadvise(file_->fd(), (off_t) (offset_ + (uint64_t) r * exact_row_bytes_),
                                     (off_t) exact_row_bytes_, POSIX_FADV_WILLNEED);
            }
            exact_list_.push_back({ t, r, slot });
        }
        const uint64_t n = exact_list_.size() - before;
        exact_rows_ += n;
        max_exact_rows_ = std::max<uint64_t>(max_exact_rows_, n);
    }
    if ((size_t) overflow * exact_row_bytes_ > overflow_bytes_.size()) {
        overflow_bytes_.resize((size_t) overflow * exact_row_bytes_);
    }
    rows_read_ += reads_.size();
    tokens_ += (uint64_t) n_tokens;
}

OutputScreenStats OutputScreen::stats() const {
    return { tokens_.load(), exact_rows_.load(), max_exact_rows_.load(), rows_read_.load() };
}

std::string OutputScreen::error() const {
    std::lock_guard<std::mutex> lock(error_mutex_);
    return error_;
}

void OutputScreen::clear_error() {
    std::lock_guard<std::mutex> lock(error_mutex_);
    error_.clear();
}

} // namespace neuralink
