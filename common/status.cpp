#include "common/status.h"

#include <cstring>

#include <fmt/format.h>

namespace livemig {

Status errno_error(const std::string& what, const std::string& path) {
  const int e = errno;
  return Status::error(fmt::format("{} {}: {}", what, path, std::strerror(e)), e);
}

}  // namespace livemig
