// A client of QEMU's machine protocol (QMP) over a Unix socket, for
// migrate-nbd qemu-migrate.
//
//   qemu-system-x86_64 ... -qmp unix:/run/vm.qmp,server=on,wait=off
//   auto qmp = QmpClient::connect("/run/vm.qmp", 10s);   // greeting + qmp_capabilities
//   auto st = (*qmp)->execute("query-status");           // {"status": "running", ...}
//
// The wire: one JSON object per line each way. QEMU first sends a greeting
// {"QMP": {...}}; a command {"execute": NAME, "arguments": {...}, "id": N}
// is answered by {"return": ..., "id": N} or {"error": {"class", "desc"},
// "id": N}; asynchronous events {"event": NAME, "data": ..., "timestamp": ...}
// may arrive at any time, also between a command and its reply. The client
// tags every command with an id, so a late reply to a command that timed out
// is recognised and dropped; events are queued until the caller takes them.
//
// Every read has a deadline. Threading: one client is used by one thread.
#pragma once

#include <chrono>
#include <deque>
#include <memory>
#include <optional>
#include <string>

#include <nlohmann/json.hpp>

#include "common/status.h"

namespace livemig::qmp {

// What one line from QEMU is.
struct Message {
  enum class Kind { Greeting, Return, Error, Event, Invalid };
  Kind kind = Kind::Invalid;
  nlohmann::json body;    // the whole object (Invalid: null)
  nlohmann::json id;      // the echoed "id" of a Return or Error (null if none)
  std::string event;      // Event: its name
  std::string error;      // Error: "<class>: <desc>"; Invalid: why
};

// Classifies one line (without the line end; a trailing '\r' is allowed).
Message parse_message(const std::string& line);

class QmpClient {
 public:
  using Ms = std::chrono::milliseconds;

  ~QmpClient();
  QmpClient(const QmpClient&) = delete;
  QmpClient& operator=(const QmpClient&) = delete;

  // Connects to the monitor socket at `path`, reads the greeting and
  // negotiates capabilities (qmp_capabilities), each within `timeout`.
  // Errors name the socket: "QMP /run/vm.qmp: Connection refused".
  static Result<std::unique_ptr<QmpClient>> connect(const std::string& path, Ms timeout);

  // Runs `command` and returns its "return" value. An error reply becomes an
  // error "<command>: <class>: <desc>"; no reply within `timeout`, a closed
  // socket or a malformed line too (the connection is then unusable, and
  // every later call fails at once).
  Result<nlohmann::json> execute(const std::string& command,
                                 const nlohmann::json& arguments = nlohmann::json::object(),
                                 Ms timeout = Ms{30'000});

  // Reads what QEMU sent until `timeout` passes or an event arrives (events
  // are queued); returns the first queued event, or nullopt when none came.
  // An error only if the connection failed.
  Result<std::optional<nlohmann::json>> wait_event(Ms timeout);

  // The events received so far and not yet taken, oldest first.
  std::deque<nlohmann::json> take_events();

  // False once the connection failed (closed by QEMU, timed out mid-line,
  // malformed); the reason is in last_error().
  bool usable() const { return fd_ >= 0 && broken_.is_ok(); }
  const Status& last_error() const { return broken_; }

  const nlohmann::json& greeting() const { return greeting_; }
  const std::string& path() const { return path_; }

 private:
  QmpClient(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}

  // The next line from QEMU, parsed, within the deadline.
  Result<Message> read_message(std::chrono::steady_clock::time_point deadline);
  Status send_line(const std::string& line, std::chrono::steady_clock::time_point deadline);
  Status fail(Status s);

  int fd_ = -1;
  std::string path_;
  std::string buf_;
  nlohmann::json greeting_;
  std::deque<nlohmann::json> events_;
  uint64_t next_id_ = 1;
  Status broken_;
};

}  // namespace livemig::qmp
