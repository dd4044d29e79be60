#include "common/connection_limit.h"

namespace livemig {

std::shared_ptr<void> ConnectionLimit::acquire(const std::string& source) {
  MutexLock lock(mu_);
  size_t& mine = by_source_[source];
  if (total_ >= total_cap_ || mine >= per_source_cap_) {
    if (mine == 0) by_source_.erase(source);
    ++refused_;
    return nullptr;
  }
  ++total_;
  ++mine;
  // The token's deleter gives the slot back.
  return std::shared_ptr<void>(this, [this, source](void*) {
    MutexLock lock(mu_);
    --total_;
    if (--by_source_[source] == 0) by_source_.erase(source);
  });
}

size_t ConnectionLimit::in_use() const {
  MutexLock lock(mu_);
  return total_;
}

size_t ConnectionLimit::refused() const {
  MutexLock lock(mu_);
  return refused_;
}

}  // namespace livemig
