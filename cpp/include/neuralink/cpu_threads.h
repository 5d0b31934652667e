#pragma once

// How many compute threads decoding gets when nobody says.

#include <string>

namespace neuralink {

// One thread per physical core among the CPUs this process may run on (its affinity: taskset, or a cpuset such
// as the one Android gives background apps), and no more than its cgroup's CPU quota allows (a container's
// --cpus), at least 1. On a hybrid CPU only its fast cores count: a slow core holds the others back at every
// layer, so a big.LITTLE phone gets its big cores (sysfs cpu_capacity at least half the fastest) and an Intel
// hybrid its P-cores. llama-cpp-python takes half of the CPUs, which assumes two hardware threads per core: on
// machines without SMT it left half of the cores idle (decoding 1.8x slower on two such cores). Where sysfs does
// not give the cores' topology, half of the allowed CPUs. The paths are parameters for tests.
// neuralink.Llama, neuralink serve and neuralink-run all decide so.
int default_thread_count(const std::string & sys_cpu = "/sys/devices/system/cpu",
                         const std::string & cgroup_root = "/sys/fs/cgroup",
                         const std::string & proc_cgroup = "/proc/self/cgroup");

} // namespace neuralink
