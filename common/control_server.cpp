#include "common/control_server.h"

#include "common/connection_limit.h"
#include "common/thread_name.h"

#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <future>

#include <boost/asio/co_spawn.hpp>
#include <boost/asio/detached.hpp>
#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/local/stream_protocol.hpp>
#include <boost/asio/read_until.hpp>
#include <boost/asio/redirect_error.hpp>
#include <boost/asio/steady_timer.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/asio/write.hpp>
#include <fmt/format.h>

namespace livemig {

namespace asio = boost::asio;
using asio::awaitable;
using asio::use_awaitable;
using asio::local::stream_protocol;

struct ControlServer::Impl {
  explicit Impl(asio::io_context& io) : acceptor(io), timer(io), work(io.get_executor()) {}
  stream_protocol::acceptor acceptor;
  asio::steady_timer timer;
  asio::executor_work_guard<asio::io_context::executor_type> work;
};

namespace {

Status socket_error(std::string_view key, const std::string& path, const char* what) {
  return Status::error(fmt::format("{}={}: {}: {}", key, path, what, std::strerror(errno)), errno);
}

// True if something accepts connections on the socket at `path`.
bool socket_in_use(const sockaddr_un& addr) {
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return false;
  bool live = ::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) == 0;
  ::close(fd);
  return live;
}

// Runs handler(request) on a thread of its own, so that a long request
// (verify, handover) does not keep other clients from their status; the
// coroutine polls for the result rather than hopping executors (Boost 1.74's
// coroutine frames must be freed on the thread that runs the io_context).
awaitable<std::string> run_off_io_thread(ControlServer::Handler& handler, std::string request,
                                         asio::any_io_executor ex) {
  auto result = std::async(std::launch::async, [&handler, request = std::move(request)] { return handler(request); });
  asio::steady_timer poll(ex);
  auto wait = std::chrono::microseconds(200);
  while (result.wait_for(std::chrono::seconds(0)) != std::future_status::ready) {
    poll.expires_after(wait);
    co_await poll.async_wait(use_awaitable);
    wait = std::min<std::chrono::microseconds>(wait * 2, std::chrono::milliseconds(20));
  }
  co_return result.get();
}

// Serves one control connection: a request per line, a reply per line.
awaitable<void> serve(stream_protocol::socket sock, ControlServer::Handler& handler) {
  std::string buf;
  // Every read has a deadline: a client silent for kIdleTimeout is dropped.
  asio::steady_timer idle(sock.get_executor());
  for (;;) {
    boost::system::error_code ec;
    idle.expires_after(ControlServer::kIdleTimeout);
    idle.async_wait([&sock](boost::system::error_code e) {
      if (!e) sock.close(e);
    });
    size_t n = co_await asio::async_read_until(
        sock, asio::dynamic_buffer(buf, ControlServer::kMaxRequestBytes), '\n',
        asio::redirect_error(use_awaitable, ec));
    idle.cancel();
    std::string reply;
    if (ec == asio::error::not_found) {  // the line outgrew the limit
      reply = fmt::format(R"({{"ok":false,"error":"request longer than {} bytes"}})",
                          ControlServer::kMaxRequestBytes) + "\n";
      co_await asio::async_write(sock, asio::buffer(reply), asio::redirect_error(use_awaitable, ec));
      co_return;
    }
    if (ec) co_return;  // EOF or the client went away
    std::string_view line(buf.data(), n - 1);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    if (!line.empty()) {
      reply = co_await run_off_io_thread(handler, std::string(line), sock.get_executor());
      reply += "\n";
      co_await asio::async_write(sock, asio::buffer(reply), asio::redirect_error(use_awaitable, ec));
      if (ec) co_return;
    }
    buf.erase(0, n);
  }
}

awaitable<void> accept_loop(stream_protocol::acceptor& acceptor, ControlServer::Handler& handler) {
  for (;;) {
    boost::system::error_code ec;
    stream_protocol::socket sock = co_await acceptor.async_accept(asio::redirect_error(use_awaitable, ec));
    if (ec == asio::error::operation_aborted || !acceptor.is_open()) co_return;
    if (ec) {  // e.g. EMFILE: keep serving the connections we have, without spinning
      co_await pause_after_accept_error();
      continue;
    }
    asio::co_spawn(acceptor.get_executor(), serve(std::move(sock), handler), asio::detached);
  }
}

}  // namespace

Result<std::unique_ptr<ControlServer>> ControlServer::bind(const std::string& path, Handler handler,
                                                           std::string_view key) {
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path)
    return Status::error(fmt::format("{}={}: path too long for a Unix socket", key, path));
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);

  struct stat st;
  if (::lstat(path.c_str(), &st) == 0) {
    if (!S_ISSOCK(st.st_mode))
      return Status::error(fmt::format("{}={}: exists and is not a socket", key, path), EEXIST);
    if (socket_in_use(addr))
      return Status::error(fmt::format("{}={}: another process is listening there", key, path), EADDRINUSE);
    ::unlink(path.c_str());  // stale socket of a process that died
  }

  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return socket_error(key, path, "socket");
  // The umask makes the socket 0600 from its creation, with no window in
  // which another user could connect. .get_ready runs single-threaded.
  mode_t old_mask = ::umask(0177);
  int rc = ::bind(fd, reinterpret_cast<sockaddr*>(&addr), sizeof addr);
  ::umask(old_mask);
  if (rc < 0 || ::listen(fd, 16) < 0) {
    Status s = socket_error(key, path, rc < 0 ? "bind" : "listen");
    ::close(fd);
    return s;
  }
  return std::unique_ptr<ControlServer>(new ControlServer(path, fd, std::move(handler)));
}

ControlServer::ControlServer(std::string path, int listen_fd, Handler handler)
    : path_(std::move(path)), listen_fd_(listen_fd), handler_(std::move(handler)) {}

ControlServer::~ControlServer() { stop(); }

void ControlServer::start(std::function<void()> tick, std::chrono::milliseconds period) {
  tick_ = std::move(tick);
  period_ = period;
  owner_pid_ = ::getpid();
  io_ = std::make_unique<asio::io_context>(1);
  impl_ = std::make_unique<Impl>(*io_);
  impl_->acceptor.assign(stream_protocol(), listen_fd_);
  listen_fd_ = -1;  // owned by the acceptor now
  asio::co_spawn(*io_, accept_loop(impl_->acceptor, handler_), asio::detached);
  schedule_tick();
  thread_ = std::thread([this] { io_->run(); });
  name_thread(thread_, "livemig-ctl-io");
}

void ControlServer::schedule_tick() {
  impl_->timer.expires_after(period_);
  impl_->timer.async_wait([this](boost::system::error_code ec) {
    if (ec) return;
    if (tick_) tick_();
    schedule_tick();
  });
}

void ControlServer::stop() {
  if (io_) {
    io_->stop();
    if (thread_.joinable()) thread_.join();
    impl_.reset();
    io_.reset();
  }
  if (listen_fd_ >= 0) {
    ::close(listen_fd_);
    listen_fd_ = -1;
  }
  if (!path_.empty()) {
    if (::getpid() == owner_pid_) ::unlink(path_.c_str());
    path_.clear();
  }
}

}  // namespace livemig
