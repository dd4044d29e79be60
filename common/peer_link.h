// One authenticated peer-protocol connection over TCP (Boost.Asio, C++20
// coroutines): the handshake of docs/protocol.md, framed reads with a
// deadline, heartbeats, and a write queue with a priority lane.
//
// Threading: every PeerLink lives on one io_context run by ONE thread; its
// handlers run there. send*, close and the counters may be called from any
// thread. connect() and call() block, so they must not be called on the io
// thread. A link keeps itself alive while its read loop runs.
//
// Replies: call() sends a request with a fresh request id and waits for the
// peer's ACK, HANDOVER_ACK, START_OK, SUMS_REPLY, CONTROL_REPLY or ERROR
// frame with the same id.
// Every other frame goes to the FrameHandler.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <utility>  // Boost 1.74's awaitable.hpp uses std::exchange without it
#include <vector>

#include <boost/asio/awaitable.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/ip/tcp.hpp>

#include "common/frame_codec.h"
#include "common/mutex.h"
#include "common/peer_auth.h"
#include "common/status.h"
#include "common/tls_context.h"
#include "common/tls_stream.h"
#include "common/uninitialized_buffer.h"

namespace livemig {

// "HOST:PORT" or "[V6ADDR]:PORT".
struct HostPort {
  std::string host;
  uint16_t port = 0;
  std::string str() const;
};
// allow_port_zero: for a listening address, where 0 lets the kernel choose.
Result<HostPort> parse_host_port(const std::string& s, bool allow_port_zero = false);
// True for 127.0.0.0/8, ::1 and "localhost".
bool is_loopback_host(const std::string& host);

class PeerLink : public std::enable_shared_from_this<PeerLink> {
 public:
  struct Frame {
    FrameHeader header;
    // Keeps DataPayload::bytes valid; read into, never zeroed first. A DATA
    // frame's block data (after its header) starts on a page boundary.
    std::vector<uint8_t, PageOffsetAllocator<uint8_t, kDataHeaderSize>> payload;
    AnyPayload message;
  };
  using FrameHandler = std::function<void(const std::shared_ptr<PeerLink>&, Frame&)>;
  using CloseHandler = std::function<void(const std::shared_ptr<PeerLink>&, const Status&)>;
  using ConnectHandler = std::function<void(Result<std::shared_ptr<PeerLink>>)>;
  using ReplyHandler = std::function<void(Result<Frame>)>;
  struct Options {
    std::string local_name = "livemig";
    std::chrono::milliseconds read_timeout{15000};  // no frame for this long: dead peer
    std::chrono::milliseconds heartbeat{1000};
    // TLS 1.3 before the livemig handshake (common/tls_context.h); null:
    // plaintext. Both ends must agree; a mismatch is refused with a message
    // that names it on both sides.
    std::shared_ptr<TlsContext> tls;
  };

  // Connects to `where`, authenticates with `secret` and says `purpose`
  // (kPurposePeer or kPurposeControl). Blocks; not on io's thread. Errors name
  // the address: unreachable, refused, timed out, wrong secret.
  static Result<std::shared_ptr<PeerLink>> connect(boost::asio::io_context& io, const HostPort& where,
                                                   const Secret& secret, std::string_view purpose,
                                                   const Options& options,
                                                   std::chrono::milliseconds timeout);
  // connect() without blocking: `done` runs once, on io's thread, with the
  // link or the failure (within `timeout`). Any thread, io's included.
  static void async_connect(boost::asio::io_context& io, const HostPort& where, const Secret& secret,
                            std::string_view purpose, const Options& options, std::chrono::milliseconds timeout,
                            ConnectHandler done);
  // Authenticates an accepted connection (server side). On failure an ERROR
  // frame has been sent and the socket closed.
  // A coroutine: `secret` and `options` must outlive it (GCC 12 miscompiles
  // by-value coroutine parameters with non-trivial copies, so they are
  // references).
  static boost::asio::awaitable<Result<std::shared_ptr<PeerLink>>> accept(
      boost::asio::ip::tcp::socket socket, const Secret& secret, const Options& options);

  ~PeerLink();

  // What the client said it connects for (kPurposePeer / kPurposeControl).
  const std::string& purpose() const { return purpose_; }
  // Whether the link runs over TLS.
  bool tls() const { return tls_ != nullptr; }
  const std::string& remote() const { return remote_; }

  // Starts reading frames (and heartbeats). Handlers run on the io thread.
  void start(FrameHandler on_frame, CloseHandler on_close);

  // Queues a frame; priority frames go out before queued normal ones.
  template <Payload T>
  void send(const T& p, uint64_t request_id, bool priority = false) {
    auto frame = encode_message(p, request_id);
    if (frame) send_raw(std::move(*frame), priority);
  }
  // Queues a DATA frame for p (p.bytes copied once, into the frame).
  void send_data(const DataPayload& p, uint64_t request_id, bool priority = false);
  void send_raw(std::string frame, bool priority);

  // Sends p with a new request id and waits for the reply (see above).
  // An ERROR reply becomes its Status. Blocks; not on io's thread.
  template <Payload T>
  Result<Frame> call(const T& p, std::chrono::milliseconds timeout) {
    uint64_t id = next_request_id();
    auto frame = encode_message(p, id);
    if (!frame) return frame.status();
    return call_raw(std::move(*frame), id, timeout, true);
  }
  // Like call(), but an ERROR reply is returned as a frame (holding an
  // ErrorPayload), so that the caller can tell the peer's explicit refusal
  // from a lost link or a timeout (those are the Status).
  template <Payload T>
  Result<Frame> call_for_reply(const T& p, std::chrono::milliseconds timeout) {
    uint64_t id = next_request_id();
    auto frame = encode_message(p, id);
    if (!frame) return frame.status();
    return call_raw(std::move(*frame), id, timeout, false);
  }

  // Pipelined calls: sends every request at once, then waits for all the
  // replies (one round trip for the lot, the frames sharing packets), in
  // the requests' order. Each result is as call_for_reply()'s (an ERROR
  // reply is a frame). Blocks.
  template <Payload T>
  std::vector<Result<Frame>> call_all(const std::vector<T>& requests, std::chrono::milliseconds timeout) {
    std::vector<std::pair<std::string, uint64_t>> frames;
    for (const T& p : requests) {
      uint64_t id = next_request_id();
      auto frame = encode_message(p, id);
      if (!frame) return std::vector<Result<Frame>>(requests.size(), frame.status());
      frames.emplace_back(std::move(*frame), id);
    }
    return call_raw_all(std::move(frames), timeout);
  }

  // call_for_reply() without blocking: `on_reply` runs once, on the io
  // thread, with the reply (an ERROR reply as a frame) or, when the link
  // closes first, its failure. No deadline of its own: close() the link to
  // give up. Any thread.
  template <Payload T>
  void call_async(const T& p, ReplyHandler on_reply) {
    uint64_t id = next_request_id();
    auto frame = encode_message(p, id);
    if (!frame) {
      fail_later(std::move(on_reply), frame.status());
      return;
    }
    call_raw_async(std::move(*frame), id, std::move(on_reply));
  }

  uint64_t next_request_id() { return next_id_.fetch_add(1, std::memory_order_relaxed); }

  // Closes the connection; the close handler runs once with `why`.
  void close(const Status& why);
  // Answers request `request_id` with an ERROR for `why`, then closes.
  void refuse(uint64_t request_id, const Status& why) {
    send(make_error_payload(why), request_id);
    close(why);
  }
  bool closed() const { return closed_.load(); }
  const Status& close_reason() const;

  // Bytes queued but not yet written.
  size_t queued_bytes() const { return queued_bytes_.load(std::memory_order_relaxed); }
  // Blocks until queued_bytes() < limit, the link closes, or timeout. True if
  // below the limit.
  bool wait_queue_below(size_t limit, std::chrono::milliseconds timeout);

  uint64_t bytes_sent() const { return bytes_sent_.load(std::memory_order_relaxed); }
  // Every byte ever queued (monotonic; includes bytes not yet sent).
  uint64_t bytes_enqueued() const { return bytes_enqueued_.load(std::memory_order_relaxed); }
  uint64_t bytes_received() const { return bytes_received_.load(std::memory_order_relaxed); }

  PeerLink(boost::asio::ip::tcp::socket socket, const Options& options);

 private:
  Result<Frame> call_raw(std::string frame, uint64_t id, std::chrono::milliseconds timeout, bool error_as_status);
  std::vector<Result<Frame>> call_raw_all(std::vector<std::pair<std::string, uint64_t>> frames,
                                          std::chrono::milliseconds timeout);
  void call_raw_async(std::string frame, uint64_t id, ReplyHandler on_reply);
  // Runs on_reply(why) on the io thread, later.
  void fail_later(ReplyHandler on_reply, Status why);
  boost::asio::awaitable<Result<Frame>> read_frame(uint32_t max_payload);
  std::string take_spare_frame();
  void keep_spare_frame(std::string frame);
  boost::asio::awaitable<void> read_loop(std::shared_ptr<PeerLink> self);
  boost::asio::awaitable<void> write_loop(std::shared_ptr<PeerLink> self);
  boost::asio::awaitable<void> heartbeat_loop(std::shared_ptr<PeerLink> self);
  boost::asio::awaitable<Status> client_handshake(const Secret& secret, std::string_view purpose);
  boost::asio::awaitable<Status> server_handshake(const Secret& secret);
  boost::asio::awaitable<void> send_now(std::string frame);
  // Exactly these bytes in or out, over TLS when the link has it.
  boost::asio::awaitable<void> read_exact(boost::asio::mutable_buffer b);
  boost::asio::awaitable<void> write_all(boost::asio::const_buffer b);
  // TLS before the livemig handshake; the Status names what went wrong.
  boost::asio::awaitable<Status> client_tls(const HostPort& where);
  boost::asio::awaitable<Status> server_tls();
  // Shuts down and closes the socket; on the io thread.
  void shut_socket();
  bool deliver_reply(Frame& frame);
  void fail_waiters(const Status& why) REQUIRES(mu_);

  boost::asio::ip::tcp::socket socket_;
  std::unique_ptr<TlsStream> tls_;
  Options options_;
  std::string purpose_;
  std::string remote_;
  FrameHandler on_frame_;
  CloseHandler on_close_;
  std::atomic<uint64_t> next_id_{1};
  std::atomic<bool> closed_{false};
  std::atomic<int64_t> last_read_ns_{0};
  uint64_t bad_frame_request_id_ = 0;  // of the last frame read_frame refused after its header; io thread only

  mutable Mutex mu_;
  std::deque<std::string> priority_queue_ GUARDED_BY(mu_);
  std::deque<std::string> normal_queue_ GUARDED_BY(mu_);
  bool writing_ GUARDED_BY(mu_) = false;
  // Large frames already written, kept for their buffers: a DATA frame is
  // built in one of them, not in fresh memory. The pusher allocates frames
  // and the io thread frees them, so malloc does not reuse them: each
  // 256 KiB frame was a new mapping, page faults and zeroed pages.
  std::vector<std::string> spare_frames_ GUARDED_BY(mu_);
  Status close_reason_ GUARDED_BY(mu_);
  struct Waiter {
    bool done = false;
    Result<Frame> result = Status::error("no reply yet");
    ReplyHandler callback;  // call_async(): runs instead of a wait
  };
  std::map<uint64_t, std::shared_ptr<Waiter>> waiters_ GUARDED_BY(mu_);
  CondVar cv_;  // waiters, queue drain
  // The limits threads wait in wait_queue_below() for, and the largest of
  // them (0: nobody waits): the writer wakes them only once the queue is
  // below it, not after every frame (a pusher 8 MiB ahead woke some six
  // times per MiB, each a futex call and a context switch).
  std::multiset<size_t> drain_limits_ GUARDED_BY(mu_);
  std::atomic<size_t> wake_below_{0};

  std::atomic<size_t> queued_bytes_{0};
  std::atomic<uint64_t> bytes_sent_{0};
  std::atomic<uint64_t> bytes_enqueued_{0};
  std::atomic<uint64_t> bytes_received_{0};
};

}  // namespace livemig
