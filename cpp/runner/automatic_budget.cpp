#include "automatic_budget.h"

#include <algorithm>
#include <fstream>
#include <sstream>

namespace neuralink_run {

namespace {

constexpr double kMarginFraction = 0.10;
constexpr uint64_t kMarginMin = 256ull << 20;

std::optional<uint64_t> read_limit(const std::string & path) {
    std::ifstream in(path);
    std::string text;
    if (!(in >> text) || text.empty() || text.find_first_not_of("0123456789") != std::string::npos) {
        return std::nullopt; // absent, or v2's "max"
    }
    const uint64_t limit = std::stoull(text);
    return limit < (1ull << 60) ? std::optional<uint64_t>(limit) : std::nullopt; // v1 writes a huge number for none
}

// /proc/self/cgroup: "N:memory:/path" (v1) or "0::/path" (v2)
std::optional<uint64_t> cgroup_limit() {
    std::ifstream in("/proc/self/cgroup");
    std::string line;
    while (std::getline(in, line)) {
        const size_t a = line.find(':'), b = a == std::string::npos ? a : line.find(':', a + 1);
        if (b == std::string::npos) {
            continue;
        }
        const std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
        std::string file;
        if (("," + controllers + ",").find(",memory,") != std::string::npos) {
            file = "/sys/fs/cgroup/memory" + path + "/memory.limit_in_bytes";
        } else if (controllers.empty()) {
            file = "/sys/fs/cgroup" + path + "/memory.max";
        } else {
            continue;
        }
        if (const auto limit = read_limit(file)) {
            return limit;
        }
    }
    return std::nullopt;
}

std::optional<uint64_t> mem_available() {
    std::ifstream in("/proc/meminfo");
    std::string key;
    uint64_t kib = 0;
    std::string unit;
    while (in >> key >> kib) {
        std::getline(in, unit);
        if (key == "MemAvailable:") {
            return kib * 1024;
        }
    }
    return std::nullopt;
}

std::string mib(uint64_t bytes) {
    std::ostringstream s;
    s << (bytes >> 20) << " MiB";
    return s.str();
}

} // namespace

std::optional<AutomaticBudget> automatic_budget(uint64_t rss) {
    std::optional<AutomaticBudget> best;
    if (const auto limit = cgroup_limit()) {
        best = AutomaticBudget { *limit, "the cgroup memory limit " + mib(*limit) };
    }
    if (const auto available = mem_available(); available && (!best || rss + *available < best->bytes)) {
        best = AutomaticBudget { rss + *available, "available memory " + mib(rss + *available) };
    }
    if (best) {
        const uint64_t margin = std::max(kMarginMin, (uint64_t) (best->bytes * kMarginFraction));
        best->bytes = best->bytes > margin ? best->bytes - margin : 0;
    }
    return best;
}

} // namespace neuralink_run
