#pragma once

// How one compute thread's reads reach the device: either the shared pread
// pool (reader threads) or the thread's own io_uring ring (no extra threads:
// the compute thread submits, and reaps completions while it waits). On a
// phone or a 2-core machine the ring avoids reader threads competing with
// compute threads for the cores.

#include "neuralink/io_pool.h"

#include <deque>
#include <memory>
#include <string>

namespace neuralink {

enum class IoBackend { Auto, Uring, Pread };
const char * io_backend_name(IoBackend b);
IoBackend io_backend_from_name(const std::string & name); // throws std::invalid_argument

class ReadQueue {
public:
    virtual ~ReadQueue() = default;
    // Queues reads; each stays alive until done or failed.
    virtual void submit(PendingRead * const * reads, size_t n) = 0;
    // Blocks until `read` completed; throws IoError if it failed.
    virtual void wait(PendingRead & read) = 0;
    // Waits for every submitted read to finish, failed or not, without throwing.
    virtual void drain() = 0;
};

// a queue that hands the thread's reads to the shared pool
std::unique_ptr<ReadQueue> make_pool_queue(IoPool & pool);

// A ring of `entries` reads in flight for one thread, or null with the reason
// in *why when the kernel refuses io_uring (old kernel, seccomp on Android).
std::unique_ptr<ReadQueue> make_uring_queue(const DirectFile & file, unsigned entries, FaultPlan & faults,
                                            std::string * why);

// Whether this process may use io_uring at all (probes once), with the reason if not.
bool uring_available(std::string * why);

} // namespace neuralink
