#pragma once

// Where this process's cgroup files are: the memory limit (memory_plan.cpp) and the CPU quota (cpu_threads.cpp)
// read them from the same lines of /proc/self/cgroup.

#include <fstream>
#include <string>
#include <vector>

namespace neuralink {

// The directories of this process's cgroup for a v1 `controller` ("memory", "cpu"), as proc_cgroup names them
// under `root` ("N:cpu,cpuacct:/path": root/cpu,cpuacct/path and root/cpu/path, a controller being mounted
// under its own name, its group's, or both), or for v2 with controller "" ("0::/path": root/path).
inline std::vector<std::string> own_cgroup_dirs(const std::string & root, const std::string & controller,
                                                const std::string & proc_cgroup) {
    std::vector<std::string> dirs;
    std::ifstream in(proc_cgroup);
    std::string line;
    while (std::getline(in, line)) {
        const size_t a = line.find(':');
        const size_t b = a == std::string::npos ? a : line.find(':', a + 1);
        if (b == std::string::npos) continue;
        const std::string controllers = line.substr(a + 1, b - a - 1), path = line.substr(b + 1);
        if (controller.empty() && controllers.empty()) {
            dirs.push_back(root + path);
        } else if (!controller.empty() && ("," + controllers + ",").find("," + controller + ",") != std::string::npos) {
            if (controllers != controller) dirs.push_back(root + "/" + controllers + path);
            dirs.push_back(root + "/" + controller + path);
        }
    }
    return dirs;
}

} // namespace neuralink
