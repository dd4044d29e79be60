// Client requests that change the disk, answered by the side that holds the
// truth (issue #17, docs/handover.md "Forwarding"). A side that is not
// authoritative (a destination before the commit, a source after it) sends
// its clients' writes, trims, zeroes and flushes to the side that is, as
// FORWARD frames, and answers the client with the outcome: the handover
// moves authority, not connections, so no client gets EROFS for being
// connected to the other side.
//
// Design notes
// ------------
// A request is applied by the receiver exactly as its own client's (the same
// gate, tracking, durability): a forwarded write at a source marks its blocks
// owed; at a destination after the commit it pulls a partly written block
// first. FUA travels with the request; a flush becomes the receiver's flush,
// so "acknowledged after flush" keeps its meaning on the authoritative disk.
// A request longer than a frame is split; the pieces go one after another.
// A receiver that is not authoritative either (authority moved while the
// request travelled) answers ESTALE and the sender looks again: authority
// may now be its own. A request whose link is lost, or that the receiver
// refuses (the links of two reconnecting sides have not settled), is sent
// again; after twice peer-timeout without an answer it fails with EIO (never
// a silent loss: the client sees the error). Sending again is safe: the
// client has no answer yet, so any write of its that overlaps is concurrent. Fast zero is not forwarded: a zero that crosses the
// network is not fast (ENOTSUP, as the NBD spec allows).
#pragma once

#include <chrono>
#include <cstdint>
#include <memory>
#include <mutex>

#include "common/frame_codec.h"
#include "common/mutex.h"
#include "common/peer_link.h"
#include "plugin/engine_stats.h"

namespace livemig {

// How long a forwarded request may take: the receiver waits up to twice
// peer-timeout for a handover to be resolved (MigrationEngine::apply), and
// then for its disk.
inline std::chrono::milliseconds forward_timeout(std::chrono::milliseconds peer_timeout) { return 3 * peer_timeout; }

// Sends `request` over `link` (split into frames of at most kMaxDataLength)
// and waits for each reply. 0, or -1 with errno: the receiver's errno, or
// ESTALE to look again and retry (the receiver is not authoritative, or
// refused the frame, or no answer came in `timeout`).
int forward_request(PeerLink& link, const ForwardPayload& request, std::chrono::milliseconds timeout,
                    EngineStats& stats);

// What a forwarded flush covers. The receiver keeps a forwarded write's
// blocks marked in memory until its next flush or FUA (like a disk's
// volatile cache); a receiver killed meanwhile forgets them, and a
// destination pulls those blocks again over the client's data. A local
// client of that receiver loses its connection and knows; a client whose
// requests are forwarded keeps its connection to this side, so this side
// must tell it: a flush fails with EIO when a write acknowledged since the
// last good flush went over a link that is no longer the one the flush goes
// over (the receiver may have restarted). And every flush after it, until
// this side's clients have all disconnected: a later flush that succeeded
// would say the lost writes are durable (NBD: a flush covers every write
// completed before it), so the error is sticky, as a failed fdatasync is
// (PresenceJournal); a client that reconnects starts afresh, as a local
// client of the restarted receiver does. A FUA write is durable on its own
// and not counted. Conservative: a link replaced without a restart (a
// network blip) counts as a restart.
class ForwardedWrites {
 public:
  // A write, trim or zero acknowledged over `link`.
  void acknowledged(const std::shared_ptr<PeerLink>& link, bool fua);
  // Before a flush goes over `link`: false if it cannot cover every
  // acknowledged write (the caller answers EIO); the writes count as
  // reported then. *mark: what the flush covers, for flushed().
  bool flush_may_cover(const std::shared_ptr<PeerLink>& link, uint64_t* mark);
  // The flush that started at `mark` succeeded.
  void flushed(uint64_t mark);
  // This side's last NBD client disconnected: no one is owed the error now.
  void clients_gone();
  bool failing() const;

 private:
  mutable Mutex mu_;
  uint64_t acknowledged_ GUARDED_BY(mu_) = 0;        // writes acknowledged so far
  uint64_t flushed_ GUARDED_BY(mu_) = 0;             // of which covered by a good flush
  std::weak_ptr<PeerLink> on_ GUARDED_BY(mu_);       // the link of the unflushed ones
  bool crossed_links_ GUARDED_BY(mu_) = false;       // unflushed writes on two links
  bool failing_ GUARDED_BY(mu_) = false;             // writes were lost: flushes fail
};

}  // namespace livemig
