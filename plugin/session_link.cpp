#include "plugin/session_link.h"

#include <utility>

namespace livemig {

using Clock = std::chrono::steady_clock;

namespace {
uint64_t wire_bytes(const PeerLink& link) { return link.bytes_sent() + link.bytes_received(); }
}  // namespace

bool SessionLink::owns(const PeerLink* link) const {
  MutexLock lock(mu_);
  return link_.get() == link;
}

std::shared_ptr<PeerLink> SessionLink::get() const {
  MutexLock lock(mu_);
  return link_;
}

void SessionLink::adopt(const std::shared_ptr<PeerLink>& link) {
  std::shared_ptr<PeerLink> old;
  {
    MutexLock lock(mu_);
    old = std::exchange(link_, link);
    if (old && old != link) closed_bytes_ += wire_bytes(*old);
  }
  if (old && old != link) old->close(Status::error("replaced by a resumed link", EPIPE));
  cv_.notify_all();
}

bool SessionLink::drop(const std::shared_ptr<PeerLink>& link) {
  {
    MutexLock lock(mu_);
    if (link_ != link) return false;
    closed_bytes_ += wire_bytes(*link_);
    link_.reset();
    down_since_ = Clock::now();
  }
  cv_.notify_all();
  return true;
}

std::shared_ptr<PeerLink> SessionLink::take() {
  std::shared_ptr<PeerLink> link;
  {
    MutexLock lock(mu_);
    link = std::exchange(link_, nullptr);
    if (link) closed_bytes_ += wire_bytes(*link);
  }
  cv_.notify_all();
  return link;
}

std::shared_ptr<PeerLink> SessionLink::wait_up(std::chrono::milliseconds timeout, const std::atomic<bool>& stopping) {
  UniqueLock lock(mu_);
  cv_.wait_for(lock, timeout, [&]() REQUIRES(mu_) { return stopping.load() || (link_ && !link_->closed()); });
  return link_;
}

Clock::time_point SessionLink::down_since() const {
  MutexLock lock(mu_);
  return down_since_;
}

void SessionLink::describe(nlohmann::json& j) const {
  MutexLock lock(mu_);
  j["link_up"] = link_ && !link_->closed();
  j["wire_bytes"] = closed_bytes_ + (link_ ? wire_bytes(*link_) : 0);
  if (!link_) j["link_down_seconds"] = std::chrono::duration<double>(Clock::now() - down_since_).count();
}

}  // namespace livemig
