// Reads answered by the other side: the side that is not authoritative
// answers a client's read through the one that is (invariant 1). A
// destination before the commit reads through its source; a source after it
// reads through its destination.
//
// Design notes
// ------------
// A read of any size is split into PULLs of at most kProxyChunk bytes (a
// DATA frame carries at most kMaxDataLength, and a PULL asks for at most
// that), sent with demand priority. The replies are DATA frames with the
// PULL's request id; each must lie inside the bytes its PULL asked for and
// carry plain or zero data (compressed data is refused, never copied). The
// read completes when every byte arrived, and fails at once when any piece
// gets an ERROR (its errno) or the link closes (EIO); otherwise after the
// timeout (ETIMEDOUT).
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>

#include "common/frame_codec.h"
#include "common/mutex.h"
#include "common/peer_link.h"
#include "common/status.h"

namespace livemig {

class ProxyReader {
 public:
  // Bytes asked for by one PULL at most.
  static constexpr uint64_t kProxyChunk = 4u << 20;

  explicit ProxyReader(std::chrono::milliseconds timeout) : timeout_(timeout) {}

  // Reads [offset, offset + count) through `link`. 0, or -1 with errno.
  int read(PeerLink& link, void* buf, uint64_t count, uint64_t offset);
  // A DATA frame with request id `id`: true if it answers a proxied read
  // (then it is consumed; a reply outside its PULL's bytes fails that read).
  bool on_data(uint64_t id, const DataPayload& p);
  // An ERROR for request `id`: true if it failed a proxied read.
  bool on_error(uint64_t id, const Status& why);
  // The link closed: every read waiting on it fails.
  void fail_all(const Status& why);
  // Reads in flight (for tests and status).
  size_t pending() const;

 private:
  struct Piece {
    char* buf;
    uint64_t offset;
    uint64_t length;
    uint64_t bytes_left;
    int error = 0;
  };

  const std::chrono::milliseconds timeout_;
  mutable Mutex mu_;
  CondVar cv_;
  std::map<uint64_t, Piece> pieces_ GUARDED_BY(mu_);  // by request id
};

}  // namespace livemig
