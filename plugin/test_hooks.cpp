#include "plugin/test_hooks.h"

#include <signal.h>
#include <unistd.h>

#include <cstdlib>
#include <string>

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

}  // namespace livemig
