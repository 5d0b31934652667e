#include "neuralink/cpu_threads.h"

#include "cgroup_dirs.h"

#include <sched.h>

#include <algorithm>
#include <cmath>
#include <fstream>
#include <optional>
#include <set>
#include <thread>
#include <utility>
#include <vector>

namespace neuralink {

namespace {

std::vector<int> allowed_cpus() {
    std::vector<int> cpus;
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof(set), &set) == 0) {
        for (int cpu = 0; cpu < CPU_SETSIZE; ++cpu) {
            if (CPU_ISSET(cpu, &set)) cpus.push_back(cpu);
        }
    }
    if (cpus.empty()) {
        const int n = (int) std::max(1u, std::thread::hardware_concurrency());
        for (int cpu = 0; cpu < n; ++cpu) cpus.push_back(cpu);
    }
    return cpus;
}

std::optional<std::string> first_word(const std::string & path) {
    std::ifstream in(path);
    std::string word;
    if (!(in >> word)) return std::nullopt;
    return word;
}

// distinct (package, core) pairs among `cpus`; nullopt where sysfs does not say for one of them
std::optional<int> physical_cores(const std::vector<int> & cpus, const std::string & sys_cpu) {
    std::set<std::pair<std::string, std::string>> cores;
    for (int cpu : cpus) {
        const std::string topology = sys_cpu + "/cpu" + std::to_string(cpu) + "/topology/";
        const auto package = first_word(topology + "physical_package_id");
        const auto core = first_word(topology + "core_id");
        if (!package || !core) return std::nullopt;
        cores.emplace(*package, *core);
    }
    return cores.empty() ? std::nullopt : std::optional<int>((int) cores.size());
}

std::optional<long long> whole_number(const std::string & text) {
    if (text.empty() || text.size() > 18 || text.find_first_not_of("-0123456789") != std::string::npos) {
        return std::nullopt;
    }
    try {
        return std::stoll(text);
    } catch (const std::exception &) {
        return std::nullopt;
    }
}

// CPUs written as a sysfs list ("0-7,16"), nullopt where the file is missing or malformed
std::optional<std::set<int>> cpu_list(const std::string & path) {
    const auto text = first_word(path);
    if (!text) return std::nullopt;
    std::set<int> cpus;
    size_t start = 0;
    while (start <= text->size()) {
        const size_t comma = std::min(text->find(',', start), text->size());
        const std::string range = text->substr(start, comma - start);
        const size_t dash = range.find('-');
        const auto first = whole_number(range.substr(0, dash));
        const auto last = dash == std::string::npos ? first : whole_number(range.substr(dash + 1));
        if (!first || !last || *first < 0 || *last < *first || *last >= CPU_SETSIZE) return std::nullopt;
        for (long long cpu = *first; cpu <= *last; ++cpu) cpus.insert((int) cpu);
        start = comma + 1;
    }
    return cpus;
}

// The CPUs among `cpus` that decode at full speed. On a hybrid CPU the slow cores hold every other thread back at
// each layer's barrier, so they are left out: on Intel hybrids those outside /sys/devices/cpu_core/cpus (the
// E-cores, whatever capacity the kernel gives them), elsewhere (big.LITTLE phones) those whose sysfs cpu_capacity
// is under half the fastest one's. Every CPU where sysfs says neither, or where only slow cores are allowed.
std::vector<int> performance_cpus(const std::vector<int> & cpus, const std::string & sys_cpu) {
    std::vector<int> fast;
    if (const auto p_cores = cpu_list(sys_cpu + "/../../cpu_core/cpus")) {
        for (int cpu : cpus) {
            if (p_cores->count(cpu)) fast.push_back(cpu);
        }
        return fast.empty() ? cpus : fast;
    }
    std::vector<long long> capacity;
    for (int cpu : cpus) {
        const auto word = first_word(sys_cpu + "/cpu" + std::to_string(cpu) + "/cpu_capacity");
        const auto value = word ? whole_number(*word) : std::nullopt;
        if (!value || *value <= 0) return cpus;
        capacity.push_back(*value);
    }
    const long long top = capacity.empty() ? 0 : *std::max_element(capacity.begin(), capacity.end());
    for (size_t k = 0; k < cpus.size(); ++k) {
        if (2 * capacity[k] >= top) fast.push_back(cpus[k]);
    }
    return fast;
}

// own_cgroup_dirs, then the mount's root: in a container with its own cgroup namespace, the container's group
std::vector<std::string> cgroup_dirs_or_root(const std::string & root, const std::string & controller,
                                             const std::string & proc_cgroup) {
    std::vector<std::string> dirs = own_cgroup_dirs(root, controller, proc_cgroup);
    dirs.push_back(controller.empty() ? root : root + "/" + controller);
    return dirs;
}

// the CPUs' worth of time the process's cgroup may use (v2 cpu.max, v1 CFS quota); nullopt when unlimited
std::optional<double> cgroup_cpu_quota(const std::string & root, const std::string & proc_cgroup) {
    for (const std::string & dir : cgroup_dirs_or_root(root, "", proc_cgroup)) {
        std::ifstream in(dir + "/cpu.max");
        std::string quota, period;
        if (!(in >> quota >> period)) continue;
        if (quota == "max") return std::nullopt;
        const auto q = whole_number(quota), p = whole_number(period);
        if (q && p && *q > 0 && *p > 0) return (double) *q / (double) *p;
    }
    for (const std::string & dir : cgroup_dirs_or_root(root, "cpu", proc_cgroup)) {
        const auto quota = first_word(dir + "/cpu.cfs_quota_us"), period = first_word(dir + "/cpu.cfs_period_us");
        if (!quota || !period) continue;
        const auto q = whole_number(*quota), p = whole_number(*period);
        if (!q || !p) continue;
        if (*q <= 0 || *p <= 0) return std::nullopt; // -1: no quota
        return (double) *q / (double) *p;
    }
    return std::nullopt;
}

} // namespace

int default_thread_count(const std::string & sys_cpu, const std::string & cgroup_root,
                         const std::string & proc_cgroup) {
    const std::vector<int> cpus = performance_cpus(allowed_cpus(), sys_cpu);
    int threads = physical_cores(cpus, sys_cpu).value_or(std::max((int) cpus.size() / 2, 1));
    if (const auto quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)) {
        threads = std::min(threads, std::max((int) std::ceil(*quota), 1));
    }
    return std::max(threads, 1);
}

} // namespace neuralink
