// livemig's version, from CMake's project(VERSION) (the top CMakeLists.txt):
// the plugin's, migrate-nbd's, livemigd's and lm-workload's --version, and
// the control status ("version"), so that livemigd can tell plugins apart.
#pragma once

#ifndef LIVEMIG_VERSION
#error "LIVEMIG_VERSION is defined for every target by the top CMakeLists.txt"
#endif

namespace livemig {
inline constexpr const char* kVersion = LIVEMIG_VERSION;
}  // namespace livemig
