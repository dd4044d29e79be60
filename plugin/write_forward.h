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

#include "common/frame_codec.h"
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

}  // namespace livemig
