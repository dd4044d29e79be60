// The one peer link of a migration session. Frames are taken only from the
// link the session owns (DATA, PULL, HANDOVER, DONE on any other link are
// refused by the engine); a resumed link replaces it; a closed one is
// dropped, and the session waits for the next.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "common/frame_codec.h"
#include "common/mutex.h"
#include "common/peer_link.h"
#include "common/status.h"

namespace livemig {

class SessionLink {
 public:
  SessionLink() : down_since_(std::chrono::steady_clock::now()) {}

  bool owns(const PeerLink* link) const;
  std::shared_ptr<PeerLink> get() const;
  // Makes `link` the session's link; closes the one it replaces.
  void adopt(const std::shared_ptr<PeerLink>& link);
  // `link` closed: forgets it if it is the session's. True if it was.
  bool drop(const std::shared_ptr<PeerLink>& link);
  // Takes the link away (the session stops).
  std::shared_ptr<PeerLink> take();
  // Waits until the session has an open link, `stopping` or the timeout.
  std::shared_ptr<PeerLink> wait_up(std::chrono::milliseconds timeout, const std::atomic<bool>& stopping);
  // Wakes wait_up() (on stop).
  void notify() { cv_.notify_all(); }
  // When the link went down (the session's start if it never was up).
  std::chrono::steady_clock::time_point down_since() const;
  // link_up, link_down_seconds while down, and wire_bytes: both
  // directions of every link this session had, into a status object.
  void describe(nlohmann::json& j) const;

 private:
  mutable Mutex mu_;
  CondVar cv_;
  std::shared_ptr<PeerLink> link_ GUARDED_BY(mu_);
  std::chrono::steady_clock::time_point down_since_ GUARDED_BY(mu_);
  // Wire bytes of the links that left this session (dropped, replaced or
  // taken), so that a session's figure is its own: the engine's stats
  // outlive sessions, and a link's close handler may run after the next
  // migration started.
  uint64_t closed_bytes_ GUARDED_BY(mu_) = 0;
};

// What a call_for_reply() answer means: the payload if it is a T; else the
// peer's ERROR as its Status, or why no answer came (link lost, timeout).
template <Payload T>
Result<T> expect_reply(Result<PeerLink::Frame> reply) {
  if (!reply) return reply.status();
  if (auto* p = std::get_if<T>(&reply->message)) return std::move(*p);
  if (auto* e = std::get_if<ErrorPayload>(&reply->message)) return status_from_error(*e);
  return protocol_error(ErrorCode::Protocol,
                        fmt::format("unexpected {} in reply", frame_type_name(frame_type_of(reply->message))));
}

// True if the peer answered with an ERROR frame (an explicit refusal), not
// silence (a lost link, a timeout).
inline bool is_refusal(const Result<PeerLink::Frame>& reply) {
  return reply && std::holds_alternative<ErrorPayload>(reply->message);
}

}  // namespace livemig
