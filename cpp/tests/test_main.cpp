#include "test_util.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <unistd.h>

namespace nltest {

std::vector<Case> & registry() {
    static std::vector<Case> cases;
    return cases;
}

const std::string & tmp_dir() {
    static const std::string dir = [] {
        // direct I/O needs a real filesystem; /tmp may be tmpfs, so prefer the working directory
        std::string tmpl = (std::filesystem::current_path() / "nltest-XXXXXX").string();
        if (!mkdtemp(tmpl.data())) {
            std::perror("mkdtemp");
            std::exit(2);
        }
        return tmpl;
    }();
    return dir;
}

} // namespace nltest

int main(int argc, char ** argv) {
    const char * only = argc > 1 ? argv[1] : nullptr;
    int failed = 0, ran = 0;
    for (const auto & c : nltest::registry()) {
        if (only && !std::strstr(c.name, only)) {
            continue;
        }
        ++ran;
        try {
            c.fn();
            std::printf("ok      %s\n", c.name);
        } catch (const std::exception & e) {
            ++failed;
            std::printf("FAILED  %s\n        %s\n", c.name, e.what());
        }
    }
    std::error_code ec;
    std::filesystem::remove_all(nltest::tmp_dir(), ec);
    std::printf("%d tests, %d failed\n", ran, failed);
    return failed ? 1 : 0;
}
