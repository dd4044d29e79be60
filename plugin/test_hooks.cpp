#include "plugin/test_hooks.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>

namespace livemig {
namespace {

// ",a,b," so that a name matches only whole.
const std::string& crash_points() {
  static const std::string points = [] {
    const char* v = std::getenv("LIVEMIG_TEST_CRASH_AT");
    return v && *v ? "," + std::string(v) + "," : std::string();
  }();
  return points;
}

}  // namespace

void crash_point(const char* name) {
  const std::string& points = crash_points();
  if (points.empty() || points.find("," + std::string(name) + ",") == std::string::npos) return;
  ::kill(::getpid(), SIGKILL);
  ::_exit(137);  // not reached
}

int test_delay_ms(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::max(0, std::atoi(v)) : 0;
}

void test_delay(const char* name) {
  if (int ms = test_delay_ms(name); ms > 0) std::this_thread::sleep_for(std::chrono::milliseconds(ms));
}

}  // namespace livemig
