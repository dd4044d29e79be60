#include "plugin/peer_server.h"

#include <netdb.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <thread>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <fmt/format.h>

#include "common/connection_limit.h"
#include "plugin/work_pool.h"

namespace livemig {

namespace asio = boost::asio;
using asio::ip::tcp;

struct PeerServer::Impl {
  explicit Impl(asio::io_context& io) : acceptor(io) {}
  tcp::acceptor acceptor;
  Secret secret;
  PeerLink::Options options;
  PeerHandler on_peer;
  ControlHandler on_control;
  WorkPool* control_pool = nullptr;
  PeerServer::Logger log;
  // Refused handshakes are logged, but at most 20 per 10 s (a stranger
  // knocking must not flood the log); the rest are counted.
  std::chrono::steady_clock::time_point log_window{};
  int logged_in_window = 0;
  int suppressed = 0;
  // Connections still in their handshake: 256 in all, 64 from one address
  // (the default limit of 1,024 descriptors keeps room for the image, the
  // links and the NBD clients).
  ConnectionLimit unauthenticated{256, 64};
};

namespace {

// CONTROL frames of one orchestration connection. Each request runs on the
// control pool: some (migrate, handover) wait for the peer, whose frames
// arrive on the io thread.
void serve_control(const std::shared_ptr<PeerLink>& link, PeerServer::ControlHandler handler, WorkPool* pool) {
  link->start(
      [handler, pool](const std::shared_ptr<PeerLink>& l, PeerLink::Frame& f) {
        auto* control = std::get_if<ControlPayload>(&f.message);
        if (!control) {
          Status s = protocol_error(ErrorCode::Protocol,
                                    fmt::format("a control connection takes CONTROL frames, not {}",
                                                frame_type_name(f.header.type)));
          l->send(make_error_payload(s), f.header.request_id);
          l->close(s);
          return;
        }
        bool queued = pool->try_post([l, handler, request = control->json, id = f.header.request_id] {
          std::string reply = handler(request);
          if (reply.size() > kMaxControlJson)
            reply = R"({"ok":false,"error":"reply too large for a CONTROL_REPLY frame"})";
          l->send(ControlReplyPayload{reply}, id);
        });
        if (!queued)
          l->send(make_error_payload(protocol_error(ErrorCode::Busy, "too many control requests queued")),
                  f.header.request_id);
      },
      [](const std::shared_ptr<PeerLink>&, const Status&) {});
}

std::string remote_of(const tcp::socket& sock) {
  boost::system::error_code ec;
  auto ep = sock.remote_endpoint(ec);
  return ec ? "?" : fmt::format("{}:{}", ep.address().to_string(), ep.port());
}

void log_refusal(PeerServer::Impl& impl, const std::string& who, const Status& why) {
  if (!impl.log) return;
  auto now = std::chrono::steady_clock::now();
  if (now - impl.log_window > std::chrono::seconds(10)) {
    if (impl.suppressed > 0) impl.log(fmt::format("peer port: {} more refused connections not logged", impl.suppressed));
    impl.log_window = now;
    impl.logged_in_window = impl.suppressed = 0;
  }
  if (++impl.logged_in_window > 20) {
    ++impl.suppressed;
    return;
  }
  impl.log(fmt::format("peer port: refused {}: {}", who, why.message()));
}

asio::awaitable<void> accept_loop(std::shared_ptr<PeerServer::Impl> impl) {
  for (;;) {
    boost::system::error_code ec;
    tcp::socket sock = co_await impl->acceptor.async_accept(asio::redirect_error(asio::use_awaitable, ec));
    if (ec == asio::error::operation_aborted || !impl->acceptor.is_open()) co_return;
    if (ec) {  // e.g. EMFILE: pause rather than spin on the same error
      co_await pause_after_accept_error();
      continue;
    }
    boost::system::error_code ignored;
    auto remote = sock.remote_endpoint(ignored);
    auto slot = impl->unauthenticated.acquire(ignored ? std::string("?") : remote.address().to_string());
    if (!slot) {
      sock.close(ignored);  // too many handshakes open: this one is dropped at once
      continue;
    }
    asio::co_spawn(
        impl->acceptor.get_executor(),
        [impl, slot, sock = std::move(sock)]() mutable -> asio::awaitable<void> {
          std::string who = sock.is_open() ? remote_of(sock) : "?";
          auto link = co_await PeerLink::accept(std::move(sock), impl->secret, impl->options);
          slot.reset();  // authenticated or not, the handshake is over
          if (!link) {  // the peer got an ERROR frame (or a TLS alert); tell the operator
            log_refusal(*impl, who, link.status());
            co_return;
          }
          if ((*link)->purpose() == kPurposeControl)
            serve_control(*link, impl->on_control, impl->control_pool);
          else
            impl->on_peer(*link);
        },
        asio::detached);
  }
}

}  // namespace

Result<std::unique_ptr<PeerServer>> PeerServer::bind(const HostPort& where) {
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  hints.ai_flags = AI_PASSIVE | AI_NUMERICSERV;
  addrinfo* res = nullptr;
  std::string port = std::to_string(where.port);
  const char* host = where.host.empty() || where.host == "*" ? nullptr : where.host.c_str();
  if (int rc = ::getaddrinfo(host, port.c_str(), &hints, &res); rc != 0)
    return Status::error(fmt::format("listen={}: {}", where.str(), gai_strerror(rc)), EINVAL);
  int fd = -1;
  int err = 0;
  for (addrinfo* ai = res; ai && fd < 0; ai = ai->ai_next) {
    fd = ::socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
    if (fd < 0) {
      err = errno;
      continue;
    }
    int one = 1;
    ::setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (::bind(fd, ai->ai_addr, ai->ai_addrlen) < 0 || ::listen(fd, 64) < 0) {
      err = errno;
      ::close(fd);
      fd = -1;
    }
  }
  ::freeaddrinfo(res);
  if (fd < 0) return Status::error(fmt::format("listen={}: {}", where.str(), std::strerror(err)), err);
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  ::getsockname(fd, reinterpret_cast<sockaddr*>(&ss), &len);
  uint16_t bound = ss.ss_family == AF_INET6 ? ntohs(reinterpret_cast<sockaddr_in6*>(&ss)->sin6_port)
                                            : ntohs(reinterpret_cast<sockaddr_in*>(&ss)->sin_port);
  return std::unique_ptr<PeerServer>(new PeerServer(fd, bound));
}

PeerServer::~PeerServer() {
  if (impl_) {
    boost::system::error_code ignored;
    impl_->acceptor.close(ignored);
  } else if (fd_ >= 0) {
    ::close(fd_);
  }
}

void PeerServer::start(asio::io_context& io, Secret secret, PeerLink::Options options, PeerHandler on_peer,
                       ControlHandler on_control, WorkPool* control_pool, Logger log) {
  impl_ = std::make_shared<Impl>(io);
  sockaddr_storage ss{};
  socklen_t len = sizeof ss;
  ::getsockname(fd_, reinterpret_cast<sockaddr*>(&ss), &len);
  impl_->acceptor.assign(ss.ss_family == AF_INET6 ? tcp::v6() : tcp::v4(), fd_);
  impl_->secret = std::move(secret);
  impl_->options = options;
  impl_->on_peer = std::move(on_peer);
  impl_->on_control = std::move(on_control);
  impl_->control_pool = control_pool;
  impl_->log = std::move(log);
  asio::co_spawn(io, accept_loop(impl_), asio::detached);
}

}  // namespace livemig
