// A local control endpoint (the plugin's control=, livemigd's --socket): a
// Unix stream socket (mode 0600) that takes one JSON request per line and
// answers one JSON line each, plus a periodic timer (the plugin's heat decay).
//
// Life cycle, fitted to nbdkit's: bind() runs in .get_ready, before nbdkit
// forks into the background, so a bad path fails the start-up; it uses plain
// system calls and creates no thread. start() runs in .after_fork: it creates
// the Asio io_context, adopts the listening socket and starts the one I/O
// thread. stop() joins it and removes the socket file.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <thread>

#include <boost/asio/io_context.hpp>

#include "common/status.h"

namespace livemig {

class ControlServer {
 public:
  using Handler = std::function<std::string(std::string_view request)>;
  static constexpr size_t kMaxRequestBytes = 64 * 1024;
  static constexpr std::chrono::seconds kIdleTimeout{600};

  // Creates, binds and listens on `path` with mode 0600. A stale socket file
  // left by a dead process is replaced; any other existing file is an error.
  // Errors name the path as "<key>=PATH" (the plugin's key, or livemigd's
  // option).
  static Result<std::unique_ptr<ControlServer>> bind(const std::string& path, Handler handler,
                                                     std::string_view key = "control");

  ~ControlServer();

  // Starts the I/O thread. tick() is called every `period` on that thread.
  void start(std::function<void()> tick, std::chrono::milliseconds period);
  // Stops the thread and, in the process that called start(), removes the
  // socket file. Idempotent.
  void stop();

 private:
  ControlServer(std::string path, int listen_fd, Handler handler);
  void schedule_tick();

  std::string path_;
  int listen_fd_;
  // The process that serves the socket (called start()); only it removes the
  // socket file. bind() runs before nbdkit forks into the background, and the
  // parent, which exits right after the fork, must not remove the socket the
  // child is serving. (A start-up that fails before start() leaves a stale
  // socket file, which the next bind() replaces.)
  pid_t owner_pid_ = -1;
  Handler handler_;
  std::function<void()> tick_;
  std::chrono::milliseconds period_{1000};
  std::unique_ptr<boost::asio::io_context> io_;
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::thread thread_;
};

}  // namespace livemig
