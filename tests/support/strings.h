// Test support: string checks the unit tests share.
#pragma once

#include <string>

namespace livemig {

// Whether `needle` occurs in `haystack` (an error message names a thing).
inline bool contains(const std::string& haystack, const std::string& needle) {
  return haystack.find(needle) != std::string::npos;
}

}  // namespace livemig
