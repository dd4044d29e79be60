#include "common/peer_link.h"

#include <charconv>
#include <future>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/connect.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/address.hpp>
#include <boost/asio/post.hpp>
#include <boost/asio/read.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <fmt/format.h>

namespace livemig {

namespace asio = boost::asio;
using asio::awaitable;
using asio::use_awaitable;
using asio::ip::tcp;

namespace {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// How long a closing link keeps its socket open to finish writing its last
// ERROR frame to a peer that is slow to read it.
constexpr std::chrono::milliseconds kLastWordTimeout{2000};
// Frames from this size on have their buffers reused (DATA frames: 256 KiB
// of payload each). The writer returns a buffer as the pusher takes one, so
// a few spares suffice; they cost their memory for the link's life (2 MiB).
constexpr size_t kSpareFrameMin = 64u << 10;
constexpr size_t kMaxSpareFrames = 8;

// True for an encoded ERROR frame.
bool is_error_frame(const std::string& frame) {
  return frame.size() >= kFrameHeaderSize &&
         static_cast<uint8_t>(frame[kHeaderTypeOffset]) == (static_cast<uint16_t>(FrameType::Error) >> 8) &&
         static_cast<uint8_t>(frame[kHeaderTypeOffset + 1]) == (static_cast<uint16_t>(FrameType::Error) & 0xff);
}

// True for the frames that answer a call().
bool is_reply_type(FrameType t) {
  return t == FrameType::Ack || t == FrameType::Error || t == FrameType::ControlReply ||
         t == FrameType::HandoverAck || t == FrameType::AuthOk || t == FrameType::StartOk ||
         t == FrameType::SumsReply || t == FrameType::ForwardReply;
}

}  // namespace

std::string HostPort::str() const {
  return host.find(':') != std::string::npos ? fmt::format("[{}]:{}", host, port)
                                             : fmt::format("{}:{}", host, port);
}

Result<HostPort> parse_host_port(const std::string& s, bool allow_port_zero) {
  HostPort hp;
  std::string port;
  if (!s.empty() && s[0] == '[') {
    auto close = s.find("]:");
    if (close == std::string::npos) return Status::error(fmt::format("'{}': expected [ADDR]:PORT", s));
    hp.host = s.substr(1, close - 1);
    port = s.substr(close + 2);
  } else {
    auto colon = s.rfind(':');
    if (colon == std::string::npos || colon == 0)
      return Status::error(fmt::format("'{}': expected HOST:PORT", s));
    hp.host = s.substr(0, colon);
    port = s.substr(colon + 1);
  }
  unsigned value = 0;
  auto [end, ec] = std::from_chars(port.data(), port.data() + port.size(), value);
  if (ec != std::errc() || end != port.data() + port.size() || (value == 0 && !allow_port_zero) || value > 65535)
    return Status::error(fmt::format("'{}': the port must be a number from {} to 65535", s, allow_port_zero ? 0 : 1));
  hp.port = static_cast<uint16_t>(value);
  return hp;
}

bool is_loopback_host(const std::string& host) {
  if (host == "localhost") return true;
  boost::system::error_code ec;
  auto addr = asio::ip::make_address(host, ec);
  return !ec && addr.is_loopback();
}

namespace {

// Unsent bytes the kernel takes from a link at most. Frames beyond it wait in
// the link's own queues, where a priority frame (a demand pull's data)
// overtakes background data; in the socket buffer it could not.
constexpr int kNotSentLowat = 128 << 10;

void tune_socket(tcp::socket& socket) {
  boost::system::error_code ec;
  socket.set_option(tcp::no_delay(true), ec);
  socket.set_option(asio::detail::socket_option::integer<IPPROTO_TCP, TCP_NOTSENT_LOWAT>(kNotSentLowat), ec);
}

}  // namespace

PeerLink::PeerLink(tcp::socket socket, const Options& options)
    : socket_(std::move(socket)), options_(options) {
  boost::system::error_code ec;
  auto ep = socket_.remote_endpoint(ec);
  remote_ = ec ? "?" : fmt::format("{}:{}", ep.address().to_string(), ep.port());
  if (socket_.is_open()) tune_socket(socket_);
  last_read_ns_ = now_ns();
}

PeerLink::~PeerLink() = default;

const Status& PeerLink::close_reason() const {
  MutexLock lock(mu_);
  return close_reason_;
}

awaitable<Result<PeerLink::Frame>> PeerLink::read_frame(uint32_t max_payload) {
  bad_frame_request_id_ = 0;
  try {
    uint8_t header_bytes[kFrameHeaderSize];
    co_await read_exact(asio::buffer(header_bytes));
    auto header = decode_header(header_bytes, max_payload);
    if (!header) co_return header.status();
    Frame f;
    f.header = *header;
    f.payload.resize(header->payload_length);
    if (!f.payload.empty()) co_await read_exact(asio::buffer(f.payload));
    bytes_received_.fetch_add(kFrameHeaderSize + f.payload.size(), std::memory_order_relaxed);
    last_read_ns_ = now_ns();
    auto message = decode_message(f.header, f.payload);
    if (!message) {
      bad_frame_request_id_ = f.header.request_id;  // the header parsed: the ERROR answers this frame
      co_return message.status();
    }
    f.message = std::move(*message);
    co_return std::move(f);
  } catch (const boost::system::system_error& e) {
    if (e.code() == asio::error::eof)
      co_return protocol_error(ErrorCode::Protocol, "peer closed the connection");
    co_return Status::error(fmt::format("connection to {}: {}", remote_, e.code().message()), EIO);
  }
}

awaitable<void> PeerLink::read_exact(asio::mutable_buffer b) {
  if (tls_) co_await tls_->read_exact(b);
  else co_await asio::async_read(socket_, b, use_awaitable);
}

awaitable<void> PeerLink::write_all(asio::const_buffer b) {
  if (tls_) co_await tls_->write_all(b);
  else co_await asio::async_write(socket_, b, use_awaitable);
}

namespace {

// The first bytes a client sends, without consuming them: a livemig frame
// starts with "LMIG", a TLS record with 0x16 0x03.
awaitable<std::string> peek(tcp::socket& socket, size_t n) {
  std::string got(n, '\0');
  boost::system::error_code ec;
  size_t have = 0;
  for (int tries = 0; tries < 100 && have < n; ++tries) {
    have = co_await socket.async_receive(asio::buffer(got), tcp::socket::message_peek,
                                         asio::redirect_error(use_awaitable, ec));
    if (ec || have == 0) break;
    if (have < n) {  // a partial first segment: wait a little for the rest
      asio::steady_timer t(socket.get_executor(), std::chrono::milliseconds(10));
      co_await t.async_wait(asio::redirect_error(use_awaitable, ec));
    }
  }
  got.resize(have);
  co_return got;
}

bool looks_like_tls(const std::string& first) {
  return first.size() >= 2 && static_cast<uint8_t>(first[0]) == 0x16 && static_cast<uint8_t>(first[1]) == 0x03;
}

}  // namespace

awaitable<Status> PeerLink::client_tls(const HostPort& where) {
  tls_ = std::make_unique<TlsStream>(socket_, options_.tls->client().native_handle());
  SSL* ssl = tls_->native_handle();
  if (options_.tls->x509()) {
    // The certificate must name what we dialled: its IP, or its host name.
    boost::system::error_code ec;
    asio::ip::make_address(where.host, ec);
    if (!ec) X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), where.host.c_str());
    else {
      SSL_set1_host(ssl, where.host.c_str());
      SSL_set_tlsext_host_name(ssl, where.host.c_str());
    }
  }
  boost::system::error_code ec = co_await tls_->handshake(/*server=*/false);
  if (!ec) co_return Status::ok();
  co_return Status::error(describe_tls_failure(ec, SSL_get_verify_result(ssl)), EKEYREJECTED);
}

awaitable<Status> PeerLink::server_tls() {
  std::string first = co_await peek(socket_, 4);
  // Closed before a byte: say so now. (Reading on would also wait forever:
  // after a read that finds EOF, Asio waits for the next epoll edge before
  // it reads again, and a closed socket gives no further edge.)
  if (first.empty()) co_return protocol_error(ErrorCode::Protocol, "peer closed the connection");
  if (!options_.tls) {
    if (!looks_like_tls(first)) co_return Status::ok();
    Status s = protocol_error(ErrorCode::Protocol, "the client started TLS, but this plugin runs with tls=off");
    co_await send_now(encode_message(make_error_payload(s), 0).value());
    co_return s;
  }
  if (first == "LMIG") {
    Status s = protocol_error(ErrorCode::TlsRequired,
                              "this plugin requires TLS; the client spoke plaintext (give it the TLS options: "
                              "--tls-certificates or --tls-psk)");
    co_await send_now(encode_message(make_error_payload(s), 0).value());
    co_return s;
  }
  tls_ = std::make_unique<TlsStream>(socket_, options_.tls->server().native_handle());
  boost::system::error_code ec = co_await tls_->handshake(/*server=*/true);
  if (!ec) co_return Status::ok();
  Status s = Status::error(describe_tls_failure(ec, SSL_get_verify_result(tls_->native_handle())), EKEYREJECTED);
  tls_.reset();
  co_return s;
}

awaitable<void> PeerLink::send_now(std::string frame) {
  try {
    co_await write_all(asio::buffer(frame));
    bytes_sent_.fetch_add(frame.size(), std::memory_order_relaxed);
  } catch (const boost::system::system_error&) {
  }
}

awaitable<Status> PeerLink::client_handshake(const Secret& secret, std::string_view purpose) {
  AuthClient auth(secret);
  HelloPayload hello;
  hello.nonce = auth.hello().value();
  hello.peer_name = options_.local_name;
  hello.purpose = std::string(purpose);
  co_await send_now(encode_message(hello, 0).value());
  auto reply = co_await read_frame(kMaxPreAuthPayload);
  if (!reply) co_return reply.status();
  if (auto* err = std::get_if<ErrorPayload>(&reply->message)) co_return status_from_error(*err);
  auto* server_hello = std::get_if<HelloPayload>(&reply->message);
  if (!server_hello) co_return protocol_error(ErrorCode::Protocol, "expected the server's HELLO");
  auto mac = auth.on_server_hello(server_hello->nonce);
  if (!mac) co_return mac.status();
  co_await send_now(encode_message(AuthPayload{*mac}, 0).value());
  auto ok = co_await read_frame(kMaxPreAuthPayload);
  if (!ok) co_return ok.status();
  if (auto* err = std::get_if<ErrorPayload>(&ok->message)) co_return status_from_error(*err);
  auto* auth_ok = std::get_if<AuthOkPayload>(&ok->message);
  if (!auth_ok) co_return protocol_error(ErrorCode::Protocol, "expected AUTH_OK");
  co_return auth.on_auth_ok(auth_ok->mac);
}

// The server proves itself only to a client that proved itself first: a
// stranger learns nothing to test guesses of the key against.
awaitable<Status> PeerLink::server_handshake(const Secret& secret) {
  AuthServer auth(secret);
  Status failure;
  auto hello = co_await read_frame(kMaxPreAuthPayload);
  if (!hello) {
    failure = hello.status();
  } else if (auto* h = std::get_if<HelloPayload>(&hello->message); !h) {
    failure = protocol_error(ErrorCode::Protocol, "expected a client HELLO first");
  } else {
    purpose_ = h->purpose;
    HelloPayload out;
    out.nonce = auth.on_hello(h->nonce).value();
    out.peer_name = options_.local_name;
    out.purpose = h->purpose;
    co_await send_now(encode_message(out, 0).value());
    auto client_auth = co_await read_frame(kMaxPreAuthPayload);
    if (!client_auth) {
      failure = client_auth.status();
    } else if (auto* a = std::get_if<AuthPayload>(&client_auth->message); !a) {
      failure = protocol_error(ErrorCode::Protocol, "expected AUTH after HELLO");
    } else if (auto mac = auth.on_auth(a->mac); !mac) {
      failure = protocol_error(ErrorCode::AuthFailed, mac.status().message());
    } else {
      co_await send_now(encode_message(AuthOkPayload{*mac}, 0).value());
      co_return Status::ok();
    }
  }
  co_await send_now(encode_message(make_error_payload(failure), 0).value());
  co_return failure;
}

Result<std::shared_ptr<PeerLink>> PeerLink::connect(asio::io_context& io, const HostPort& where,
                                                    const Secret& secret, std::string_view purpose,
                                                    const Options& options,
                                                    std::chrono::milliseconds timeout) {
  auto promise = std::make_shared<std::promise<Result<std::shared_ptr<PeerLink>>>>();
  auto future = promise->get_future();
  async_connect(io, where, secret, purpose, options, timeout,
                [promise](Result<std::shared_ptr<PeerLink>> r) { promise->set_value(std::move(r)); });
  return future.get();
}

void PeerLink::async_connect(asio::io_context& io, const HostPort& where, const Secret& secret,
                             std::string_view purpose, const Options& options, std::chrono::milliseconds timeout,
                             ConnectHandler done) {
  std::string purpose_copy(purpose);
  asio::co_spawn(
      io,
      [&io, where, secret, purpose_copy, options, timeout, done = std::move(done)]() -> awaitable<void> {
        auto link = std::make_shared<PeerLink>(tcp::socket(io), options);
        asio::steady_timer deadline(io, timeout);
        bool timed_out = false;
        deadline.async_wait([&, link](boost::system::error_code ec) {
          if (ec) return;
          timed_out = true;
          boost::system::error_code ignored;
          link->socket_.close(ignored);
        });
        Status status;
        try {
          tcp::resolver resolver(io);
          auto endpoints = co_await resolver.async_resolve(where.host, std::to_string(where.port), use_awaitable);
          co_await asio::async_connect(link->socket_, endpoints, use_awaitable);
          boost::system::error_code ec;
          tune_socket(link->socket_);
          auto ep = link->socket_.remote_endpoint(ec);
          if (!ec) link->remote_ = fmt::format("{}:{}", ep.address().to_string(), ep.port());
          if (options.tls) status = co_await link->client_tls(where);
          if (status) status = co_await link->client_handshake(secret, purpose_copy);
        } catch (const boost::system::system_error& e) {
          status = Status::error(e.code().message(), e.code().value() ? e.code().value() : EIO);
        }
        deadline.cancel();
        if (timed_out) status = Status::error("timed out", ETIMEDOUT);
        if (!status) {
          done(Status::error(fmt::format("{}: {}", where.str(), status.message()), status.errno_value()));
          co_return;
        }
        link->purpose_ = purpose_copy;
        done(link);
      },
      asio::detached);
}

awaitable<Result<std::shared_ptr<PeerLink>>> PeerLink::accept(tcp::socket socket, const Secret& secret,
                                                              const Options& options) {
  auto executor = socket.get_executor();
  auto link = std::make_shared<PeerLink>(std::move(socket), options);
  // The handshake must finish within the read timeout, or the socket closes.
  asio::steady_timer deadline(executor, options.read_timeout);
  deadline.async_wait([link](boost::system::error_code ec) {
    if (ec) return;
    boost::system::error_code ignored;
    link->socket_.close(ignored);
  });
  Status s = co_await link->server_tls();
  if (s) s = co_await link->server_handshake(secret);
  deadline.cancel();
  if (!s) {
    boost::system::error_code ignored;
    link->socket_.close(ignored);
    co_return s;
  }
  co_return link;
}

void PeerLink::start(FrameHandler on_frame, CloseHandler on_close) {
  on_frame_ = std::move(on_frame);
  on_close_ = std::move(on_close);
  auto self = shared_from_this();
  asio::post(socket_.get_executor(), [self] {
    self->last_read_ns_ = now_ns();
    asio::co_spawn(self->socket_.get_executor(), self->read_loop(self), asio::detached);
    asio::co_spawn(self->socket_.get_executor(), self->heartbeat_loop(self), asio::detached);
  });
}

// `self` keeps the link alive while the loop runs (a coroutine parameter
// lives in its frame; a shared_from_this() inside the body would run too late).
awaitable<void> PeerLink::read_loop(std::shared_ptr<PeerLink> self) {
  while (!closed_) {
    auto frame = co_await read_frame(kMaxFramePayload);
    if (!frame) {
      // A malformed frame gets an ERROR frame before the close; a dead
      // connection just closes.
      // Queued, not written here: the write loop may be in the middle of a
      // frame. close() still sends it, then closes the socket.
      if (!closed_ && frame.status().errno_value() != EIO &&
          frame.status().message() != "peer closed the connection")
        send_raw(encode_message(make_error_payload(frame.status()), bad_frame_request_id_).value(), true);
      close(frame.status());
      co_return;
    }
    if (closed_) co_return;  // closed (from another thread) while this frame was read
    if (frame->header.type == FrameType::Heartbeat) continue;
    if (deliver_reply(*frame)) continue;
    try {
      if (on_frame_) on_frame_(self, *frame);
    } catch (const std::exception& e) {
      close(Status::error(fmt::format("handling {} frame: {}", frame_type_name(frame->header.type), e.what()), EIO));
    }
  }
}

awaitable<void> PeerLink::heartbeat_loop(std::shared_ptr<PeerLink> self) {
  asio::steady_timer timer(socket_.get_executor());
  uint64_t seq = 0;
  while (!closed_) {
    timer.expires_after(options_.heartbeat);
    try {
      co_await timer.async_wait(use_awaitable);
    } catch (const boost::system::system_error&) {
      co_return;
    }
    if (closed_) co_return;
    auto silent = std::chrono::nanoseconds(now_ns() - last_read_ns_.load());
    if (silent > options_.read_timeout) {
      close(Status::error(fmt::format("peer {} silent for {} ms: assumed dead", remote_,
                                      std::chrono::duration_cast<std::chrono::milliseconds>(silent).count()),
                          ETIMEDOUT));
      co_return;
    }
    send(HeartbeatPayload{++seq, static_cast<uint64_t>(now_ns())}, 0, true);
  }
}

bool PeerLink::deliver_reply(Frame& frame) {
  if (!is_reply_type(frame.header.type) || frame.header.request_id == 0) return false;
  ReplyHandler callback;
  {
    MutexLock lock(mu_);
    auto it = waiters_.find(frame.header.request_id);
    if (it == waiters_.end()) return false;
    callback = std::move(it->second->callback);
    if (!callback) {
      it->second->result = std::move(frame);
      it->second->done = true;
    }
    waiters_.erase(it);
  }
  if (callback) callback(std::move(frame));  // on the io thread, no lock held
  else cv_.notify_all();
  return true;
}

void PeerLink::call_raw_async(std::string frame, uint64_t id, ReplyHandler on_reply) {
  {
    MutexLock lock(mu_);
    if (closed_) {
      fail_later(std::move(on_reply),
                 Status::error(fmt::format("link to {} is closed: {}", remote_, close_reason_.message()), EPIPE));
      return;
    }
    auto w = std::make_shared<Waiter>();
    w->callback = std::move(on_reply);
    waiters_[id] = std::move(w);
  }
  send_raw(std::move(frame), false);
}

void PeerLink::fail_later(ReplyHandler on_reply, Status why) {
  asio::post(socket_.get_executor(), [cb = std::move(on_reply), why = std::move(why)] { cb(why); });
}

void PeerLink::send_data(const DataPayload& p, uint64_t request_id, bool priority) {
  std::string frame = p.bytes.size() >= kSpareFrameMin ? take_spare_frame() : std::string();
  frame.append(encode_data_prefix(p, request_id));
  frame.append(reinterpret_cast<const char*>(p.bytes.data()), p.bytes.size());
  send_raw(std::move(frame), priority);
}

std::string PeerLink::take_spare_frame() {
  MutexLock lock(mu_);
  if (spare_frames_.empty()) return {};
  std::string frame = std::move(spare_frames_.back());
  spare_frames_.pop_back();
  frame.clear();  // keeps the capacity
  return frame;
}

void PeerLink::keep_spare_frame(std::string frame) {
  if (frame.capacity() < kSpareFrameMin) return;
  MutexLock lock(mu_);
  if (spare_frames_.size() < kMaxSpareFrames) spare_frames_.push_back(std::move(frame));
}

void PeerLink::send_raw(std::string frame, bool priority) {
  if (closed_) return;
  bool start_writer = false;
  {
    MutexLock lock(mu_);
    if (closed_) return;  // close() may have run since the check above
    bytes_enqueued_.fetch_add(frame.size(), std::memory_order_relaxed);
    queued_bytes_.fetch_add(frame.size(), std::memory_order_relaxed);
    (priority ? priority_queue_ : normal_queue_).push_back(std::move(frame));
    if (!writing_) writing_ = start_writer = true;
  }
  if (start_writer) {
    auto self = shared_from_this();
    asio::co_spawn(socket_.get_executor(), write_loop(self), asio::detached);
  }
}

awaitable<void> PeerLink::write_loop(std::shared_ptr<PeerLink> self) {
  for (;;) {
    std::string frame;
    {
      MutexLock lock(mu_);
      // After close() the queues hold at most its last ERROR frame.
      auto& q = !priority_queue_.empty() ? priority_queue_ : normal_queue_;
      if (q.empty()) {
        writing_ = false;
        if (closed_) shut_socket();  // the last word is out
        co_return;
      }
      frame = std::move(q.front());
      q.pop_front();
    }
    try {
      co_await write_all(asio::buffer(frame));
      bytes_sent_.fetch_add(frame.size(), std::memory_order_relaxed);
    } catch (const boost::system::system_error& e) {
      queued_bytes_.fetch_sub(frame.size(), std::memory_order_relaxed);
      close(Status::error(fmt::format("sending to {}: {}", remote_, e.code().message()), EIO));
      shut_socket();
      MutexLock lock(mu_);
      writing_ = false;
      co_return;
    }
    // seq_cst, with wait_queue_below()'s store and load: either it sees
    // this drain or this sees its limit.
    const size_t left = queued_bytes_.fetch_sub(frame.size()) - frame.size();
    if (left < wake_below_.load()) {
      { MutexLock lock(mu_); }  // a waiter that tested the queue before the drain is now asleep
      cv_.notify_all();
    }
    keep_spare_frame(std::move(frame));
  }
}

Result<PeerLink::Frame> PeerLink::call_raw(std::string frame, uint64_t id, std::chrono::milliseconds timeout,
                                           bool error_as_status) {
  std::vector<std::pair<std::string, uint64_t>> one;
  one.emplace_back(std::move(frame), id);
  Result<Frame> r = std::move(call_raw_all(std::move(one), timeout)[0]);
  if (error_as_status && r)
    if (auto* err = std::get_if<ErrorPayload>(&r->message)) return status_from_error(*err);
  return r;
}

std::vector<Result<PeerLink::Frame>> PeerLink::call_raw_all(std::vector<std::pair<std::string, uint64_t>> frames,
                                                            std::chrono::milliseconds timeout) {
  std::vector<std::shared_ptr<Waiter>> waiters;
  {
    MutexLock lock(mu_);
    if (closed_)
      return std::vector<Result<Frame>>(
          frames.size(), Status::error(fmt::format("link to {} is closed: {}", remote_, close_reason_.message()), EPIPE));
    for (auto& [frame, id] : frames) waiters.push_back(waiters_[id] = std::make_shared<Waiter>());
  }
  for (auto& [frame, id] : frames) send_raw(std::move(frame), false);
  std::vector<Result<Frame>> results;
  UniqueLock lock(mu_);
  const auto deadline = std::chrono::steady_clock::now() + timeout;
  for (size_t i = 0; i < waiters.size(); ++i) {
    if (!cv_.wait_until(lock, deadline, [&] { return waiters[i]->done; })) {
      waiters_.erase(frames[i].second);
      results.push_back(Status::error(fmt::format("no reply from {} within {} ms", remote_, timeout.count()), ETIMEDOUT));
      continue;
    }
    results.push_back(std::move(waiters[i]->result));
  }
  return results;
}

bool PeerLink::wait_queue_below(size_t limit, std::chrono::milliseconds timeout) {
  UniqueLock lock(mu_);
  auto registered = drain_limits_.insert(limit);
  wake_below_.store(*drain_limits_.rbegin());
  const bool below = cv_.wait_for(lock, timeout, [&] { return closed_ || queued_bytes_.load() < limit; }) && !closed_;
  drain_limits_.erase(registered);
  wake_below_.store(drain_limits_.empty() ? 0 : *drain_limits_.rbegin());
  return below;
}

void PeerLink::fail_waiters(const Status& why) {
  for (auto& [id, w] : waiters_) {
    if (w->callback) {
      fail_later(std::move(w->callback), why);
      continue;
    }
    w->result = why;
    w->done = true;
  }
  waiters_.clear();
}

void PeerLink::shut_socket() {
  boost::system::error_code ignored;
  socket_.shutdown(tcp::socket::shutdown_both, ignored);
  socket_.close(ignored);
}

void PeerLink::close(const Status& why) {
  if (closed_.exchange(true)) return;
  {
    MutexLock lock(mu_);
    close_reason_ = why;
    fail_waiters(Status::error(fmt::format("link to {} closed: {}", remote_, why.message()),
                               why.errno_value() ? why.errno_value() : EPIPE));
    // Every queued frame is dropped but the first ERROR: the usual way to
    // refuse something is send(ERROR) then close(), and the peer must learn
    // why (docs/protocol.md: one ERROR frame, then the connection closes).
    std::string last_word;
    size_t dropped = 0;
    for (auto* q : {&priority_queue_, &normal_queue_}) {
      for (auto& f : *q) {
        if (last_word.empty() && is_error_frame(f)) last_word = std::move(f);
        else dropped += f.size();
      }
      q->clear();
    }
    if (!last_word.empty()) priority_queue_.push_back(std::move(last_word));
    queued_bytes_.fetch_sub(dropped, std::memory_order_relaxed);
  }
  cv_.notify_all();
  auto self = shared_from_this();
  // The socket is closed on its own thread, where its operations run: now,
  // or by the write loop once the last ERROR frame is written (at most
  // kLastWordTimeout later, for a peer that does not read).
  asio::post(socket_.get_executor(), [self, why] {
    bool start_writer = false;
    bool linger = false;
    {
      MutexLock lock(self->mu_);
      if (!self->writing_ && !self->priority_queue_.empty()) self->writing_ = start_writer = true;
      linger = self->writing_;
    }
    if (start_writer) asio::co_spawn(self->socket_.get_executor(), self->write_loop(self), asio::detached);
    if (linger) {
      auto executor = self->socket_.get_executor();
      asio::co_spawn(
          executor,
          [executor, weak = std::weak_ptr<PeerLink>(self)]() -> awaitable<void> {
            asio::steady_timer timer(executor, kLastWordTimeout);
            boost::system::error_code ec;
            co_await timer.async_wait(asio::redirect_error(use_awaitable, ec));
            if (auto link = weak.lock()) link->shut_socket();
          },
          asio::detached);
    } else {
      self->shut_socket();
    }
    if (self->on_close_) {
      auto handler = std::move(self->on_close_);
      handler(self, why);
    }
  });
}

}  // namespace livemig
