#pragma once

// What neuralink-run may hold when no --memory-budget or --cache-bytes is
// given, as neuralink.Llama without memory_budget= (memory_budget.py,
// automatic_budget): the bundle cache is sized from the memory there is.

#include <cstdint>
#include <optional>
#include <string>

namespace neuralink_run {

struct AutomaticBudget {
    uint64_t bytes = 0;
    std::string source; // where it came from, for the log
};

// The tighter of this process's cgroup memory limit (v1 or v2) and `rss` plus the system's available memory,
// less a margin (10 %, at least 256 MiB) for the rest of the system and for allocations no plan sees; nullopt
// where neither can be read.
std::optional<AutomaticBudget> automatic_budget(uint64_t rss);

} // namespace neuralink_run
