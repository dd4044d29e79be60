#include "plugin/write_forward.h"

#include <algorithm>
#include <cerrno>
#include <thread>

#include "plugin/session_link.h"

namespace livemig {

namespace {

int forward_one(PeerLink& link, const ForwardPayload& piece, std::chrono::milliseconds timeout) {
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (;;) {
    auto reply = expect_reply<ForwardReplyPayload>(link.call(piece, timeout));
    if (!reply) {
      // The peer refused the frame (this link is not its migration's link:
      // both sides reconnected, and the links have not settled yet), or the
      // link was lost: look again and retry (the engine bounds the retries).
      errno = ESTALE;
      return -1;
    }
    if (reply->error == EBUSY && std::chrono::steady_clock::now() < deadline) {
      // The receiver's queue is full: its disk is behind. Wait a little.
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
      continue;
    }
    if (reply->error != 0) {
      errno = static_cast<int>(reply->error);
      return -1;
    }
    return 0;
  }
}

}  // namespace

int forward_request(PeerLink& link, const ForwardPayload& request, std::chrono::milliseconds timeout,
                    EngineStats& stats) {
  const auto t0 = EngineStats::Clock::now();
  ForwardPayload piece = request;
  uint64_t done = 0;
  do {
    piece.offset = request.offset + done;
    piece.length = static_cast<uint32_t>(std::min<uint64_t>(request.length - done, kMaxDataLength));
    if (request.op == ForwardOp::Write) piece.bytes = request.bytes.subspan(done, piece.length);
    if (forward_one(link, piece, timeout) < 0) return -1;
    done += piece.length;
  } while (done < request.length);
  stats.forwarded_requests.fetch_add(1, std::memory_order_relaxed);
  stats.forwarded_bytes.fetch_add(request.length, std::memory_order_relaxed);
  stats.forward_delay.add(std::chrono::duration<double, std::milli>(EngineStats::Clock::now() - t0).count());
  return 0;
}

void ForwardedWrites::acknowledged(const std::shared_ptr<PeerLink>& link, bool fua) {
  if (fua) return;
  MutexLock lock(mu_);
  if (acknowledged_ == flushed_) {
    on_ = link;
  } else if (on_.lock() != link) {
    crossed_links_ = true;
  }
  ++acknowledged_;
}

bool ForwardedWrites::flush_may_cover(const std::shared_ptr<PeerLink>& link, uint64_t* mark) {
  MutexLock lock(mu_);
  *mark = acknowledged_;
  if (failing_) return false;
  if (acknowledged_ == flushed_) return true;
  if (!crossed_links_ && on_.lock() == link) return true;
  failing_ = true;
  return false;
}

void ForwardedWrites::clients_gone() {
  MutexLock lock(mu_);
  failing_ = false;
  crossed_links_ = false;
  flushed_ = acknowledged_;
}

bool ForwardedWrites::failing() const {
  MutexLock lock(mu_);
  return failing_;
}

void ForwardedWrites::flushed(uint64_t mark) {
  MutexLock lock(mu_);
  flushed_ = std::max(flushed_, mark);
  if (flushed_ == acknowledged_) crossed_links_ = false;
}

}  // namespace livemig
