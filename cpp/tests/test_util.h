#pragma once

// A minimal test harness: TEST registers a function, CHECK* throw on failure.

#include <cmath>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace nltest {

struct Case {
    const char * name;
    void (*fn)();
};

std::vector<Case> & registry();

struct Register {
    Register(const char * name, void (*fn)()) { registry().push_back({ name, fn }); }
};

struct Failure : std::runtime_error {
    using std::runtime_error::runtime_error;
};

inline std::string where(const char * file, int line) {
    std::ostringstream s;
    s << file << ":" << line << ": ";
    return s.str();
}

// scratch directory for files a test writes (removed by the harness at exit)
const std::string & tmp_dir();

} // namespace nltest

#define TEST(name)                                               \
    static void name();                                          \
    static nltest::Register name##_registered(#name, name);      \
    static void name()

#define CHECK(cond)                                                                       \
    do {                                                                                  \
        if (!(cond)) throw nltest::Failure(nltest::where(__FILE__, __LINE__) + #cond);    \
    } while (0)

#define CHECK_NEAR(a, b, tol)                                                                       \
    do {                                                                                            \
        const double va_ = (a), vb_ = (b);                                                          \
        if (!(std::fabs(va_ - vb_) <= (tol))) {                                                     \
            std::ostringstream s_;                                                                  \
            s_ << nltest::where(__FILE__, __LINE__) << #a << " = " << va_ << " vs " << #b << " = "  \
               << vb_ << " (tolerance " << (tol) << ")";                                            \
            throw nltest::Failure(s_.str());                                                        \
        }                                                                                           \
    } while (0)

// expr must throw an exception of type E whose what() contains substr
#define CHECK_THROWS(E, expr, substr)                                                               \
    do {                                                                                            \
        bool thrown_ = false;                                                                       \
        try {                                                                                       \
            (void) (expr);                                                                          \
        } catch (const E & e_) {                                                                    \
            thrown_ = true;                                                                         \
            if (std::string(e_.what()).find(substr) == std::string::npos)                          \
                throw nltest::Failure(nltest::where(__FILE__, __LINE__) + "message '" + e_.what() + \
                                      "' lacks '" + (substr) + "'");                                \
        }                                                                                           \
        if (!thrown_) throw nltest::Failure(nltest::where(__FILE__, __LINE__) + #expr " did not throw"); \
    } while (0)
