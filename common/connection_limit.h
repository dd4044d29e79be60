// Bounds on connections that have not authenticated yet, and what an accept
// loop does when the process runs out of descriptors (issue #13: ~1,000
// idle TCP connections exhausted the descriptors, and the accept loops then
// spun on EMFILE, busy-looping the io thread that carries the migration).
//
// A connection takes a slot before its handshake and gives it back when the
// handshake ends (authenticated or not). Over the total cap, or over the cap
// for its source address, it is closed at once: a stranger cannot hold more
// than a few descriptors, and the handshake deadline (peer-timeout) frees
// those.
#pragma once

#include <chrono>
#include <cstddef>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <utility>  // Boost 1.74's awaitable.hpp uses std::exchange without it

#include <boost/asio/awaitable.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/this_coro.hpp>
#include <boost/asio/use_awaitable.hpp>

#include "common/mutex.h"

namespace livemig {

class ConnectionLimit {
 public:
  ConnectionLimit(size_t total, size_t per_source) : total_cap_(total), per_source_cap_(per_source) {}

  // A slot for a connection from `source` (released when the last copy of
  // the token goes away), or null when a cap is reached.
  std::shared_ptr<void> acquire(const std::string& source);
  size_t in_use() const;
  // Connections refused so far (for status and tests).
  size_t refused() const;

 private:
  const size_t total_cap_;
  const size_t per_source_cap_;
  mutable Mutex mu_;
  size_t total_ GUARDED_BY(mu_) = 0;
  size_t refused_ GUARDED_BY(mu_) = 0;
  std::map<std::string, size_t> by_source_ GUARDED_BY(mu_);
};

// How long an accept loop waits after an accept error other than its own
// cancellation: the failed connection stays queued, so retrying at once
// spins on the same error (EMFILE, ENFILE, ENOBUFS, ENOMEM).
inline constexpr std::chrono::milliseconds kAcceptErrorPause{100};

// Waits kAcceptErrorPause on the calling coroutine's executor.
inline boost::asio::awaitable<void> pause_after_accept_error() {
  boost::asio::steady_timer timer(co_await boost::asio::this_coro::executor, kAcceptErrorPause);
  boost::system::error_code ignored;
  co_await timer.async_wait(boost::asio::redirect_error(boost::asio::use_awaitable, ignored));
}

}  // namespace livemig
