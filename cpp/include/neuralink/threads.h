#pragma once

// Short parallel loops outside llama.cpp's thread pool (scoring helpers, the store's preload).

#include <algorithm>
#include <thread>
#include <vector>

namespace neuralink {

// Runs work(k) for k = 0..n-1 (at least once, k = 0): k = 0 on the calling thread, the others on threads of
// their own; returns when all are done. `work` must not throw on the other threads.
template <typename Work>
void run_on_threads(int n, Work && work) {
    std::vector<std::thread> pool;
    for (int k = 1; k < n; ++k) pool.emplace_back(work, k);
    work(0);
    for (std::thread & t : pool) t.join();
}

} // namespace neuralink
