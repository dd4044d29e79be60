// Unit tests of the QMP client: what each line from QEMU is, and the client
// against a fake monitor on a Unix socket that plays QEMU's side of a
// script (greeting, replies, events between them, errors, a hang-up).
#include "client-tools/qmp_client.h"

#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "common/mutex.h"

using namespace livemig::qmp;
using nlohmann::json;
using std::chrono::milliseconds;

namespace {

const char* kGreeting = R"({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}})";

// Catch2's assertions are not thread-safe: what the fake monitor's thread
// finds wrong is recorded here, and ~FakeMonitor reports it on the test's
// thread (TSan saw the races the direct CHECKs made).
livemig::Mutex script_failures_mu;
std::vector<std::string> script_failures GUARDED_BY(script_failures_mu);

void script_check(bool ok, const char* what, int line) {
  if (ok) return;
  livemig::MutexLock lock(script_failures_mu);
  script_failures.push_back("line " + std::to_string(line) + ": " + what);
}

#define SCRIPT_CHECK(cond) script_check(static_cast<bool>(cond), #cond, __LINE__)
#define SCRIPT_CHECK_FALSE(cond) script_check(!(cond), "!(" #cond ")", __LINE__)

// Reads one line (without '\n') from fd; empty at EOF.
std::string read_line(int fd) {
  std::string line;
  char c;
  while (::read(fd, &c, 1) == 1 && c != '\n') line += c;
  return line;
}

void write_line(int fd, const std::string& s) {
  std::string out = s + "\r\n";  // QEMU ends its lines so
  SCRIPT_CHECK(::write(fd, out.data(), out.size()) == static_cast<ssize_t>(out.size()));
}

// The id of a command line the client sent.
json id_of(const std::string& line) { return json::parse(line).value("id", json()); }

std::string reply(const json& id, const json& ret) { return json{{"return", ret}, {"id", id}}.dump(); }

// A monitor socket in a fresh directory; `script` runs on the accepted
// connection in a thread, then the connection is closed.
class FakeMonitor {
 public:
  explicit FakeMonitor(std::function<void(int)> script) : script_(std::move(script)) {
    char tmpl[] = "/tmp/qmp-test-XXXXXX";
    dir_ = ::mkdtemp(tmpl);
    path_ = dir_ + "/qmp.sock";
    listener_ = ::socket(AF_UNIX, SOCK_STREAM, 0);
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::strcpy(addr.sun_path, path_.c_str());
    REQUIRE(::bind(listener_, reinterpret_cast<sockaddr*>(&addr), sizeof addr) == 0);
    REQUIRE(::listen(listener_, 1) == 0);
    thread_ = std::thread([this] {
      int fd = ::accept(listener_, nullptr, nullptr);
      if (fd < 0) return;
      script_(fd);
      ::close(fd);
    });
  }
  ~FakeMonitor() {
    ::shutdown(listener_, SHUT_RDWR);
    thread_.join();
    ::close(listener_);
    ::unlink(path_.c_str());
    ::rmdir(dir_.c_str());
    std::vector<std::string> failures;
    {
      livemig::MutexLock lock(script_failures_mu);
      failures.swap(script_failures);
    }
    for (const std::string& f : failures) FAIL_CHECK("the fake monitor's script: " << f);
  }
  const std::string& path() const { return path_; }

 private:
  std::function<void(int)> script_;
  std::string dir_, path_;
  int listener_ = -1;
  std::thread thread_;
};

// QEMU's side of connecting: the greeting, then the reply to qmp_capabilities.
void handshake(int fd) {
  write_line(fd, kGreeting);
  std::string caps = read_line(fd);
  SCRIPT_CHECK(json::parse(caps)["execute"] == "qmp_capabilities");
  write_line(fd, reply(id_of(caps), json::object()));
}

}  // namespace

TEST_CASE("a QMP line is a greeting, a reply, an error or an event") {
  CHECK(parse_message(kGreeting).kind == Message::Kind::Greeting);
  Message r = parse_message(R"({"return": {"status": "running"}, "id": 7})");
  CHECK(r.kind == Message::Kind::Return);
  CHECK(r.id == 7);
  CHECK(r.body["return"]["status"] == "running");
  Message e = parse_message(R"({"error": {"class": "GenericError", "desc": "no such device"}, "id": 3})" "\r");
  CHECK(e.kind == Message::Kind::Error);
  CHECK(e.error == "GenericError: no such device");
  CHECK(e.id == 3);
  Message ev = parse_message(
      R"({"timestamp": {"seconds": 1, "microseconds": 2}, "event": "MIGRATION", "data": {"status": "pre-switchover"}})");
  CHECK(ev.kind == Message::Kind::Event);
  CHECK(ev.event == "MIGRATION");
  CHECK(ev.id.is_null());
  CHECK(parse_message("not json").kind == Message::Kind::Invalid);
  CHECK(parse_message("[1, 2]").kind == Message::Kind::Invalid);
  CHECK(parse_message(R"({"something": "else"})").kind == Message::Kind::Invalid);
}

TEST_CASE("connecting negotiates capabilities and a command returns its reply") {
  FakeMonitor mon([](int fd) {
    handshake(fd);
    std::string cmd = read_line(fd);
    json j = json::parse(cmd);
    SCRIPT_CHECK(j["execute"] == "query-status");
    SCRIPT_CHECK_FALSE(j.contains("arguments"));
    write_line(fd, reply(id_of(cmd), {{"status", "running"}, {"running", true}}));
    read_line(fd);  // until the client hangs up
  });
  auto c = QmpClient::connect(mon.path(), milliseconds(5000));
  REQUIRE(c);
  CHECK((*c)->greeting()["version"]["qemu"]["major"] == 7);
  auto st = (*c)->execute("query-status");
  REQUIRE(st);
  CHECK((*st)["status"] == "running");
}

TEST_CASE("events between a command and its reply are queued, not taken for the reply") {
  FakeMonitor mon([](int fd) {
    handshake(fd);
    std::string cmd = read_line(fd);
    SCRIPT_CHECK(json::parse(cmd)["arguments"]["uri"] == "tcp:127.0.0.1:4444");
    write_line(fd, R"({"event": "MIGRATION", "data": {"status": "setup"}, "timestamp": {}})");
    write_line(fd, R"({"event": "MIGRATION_PASS", "data": {"pass": 1}, "timestamp": {}})");
    write_line(fd, reply(id_of(cmd), json::object()));
    write_line(fd, R"({"event": "MIGRATION", "data": {"status": "pre-switchover"}, "timestamp": {}})");
    read_line(fd);
  });
  auto c = QmpClient::connect(mon.path(), milliseconds(5000));
  REQUIRE(c);
  auto r = (*c)->execute("migrate", {{"uri", "tcp:127.0.0.1:4444"}});
  REQUIRE(r);
  CHECK(*r == json::object());
  auto events = (*c)->take_events();
  REQUIRE(events.size() == 2);
  CHECK(events[0]["data"]["status"] == "setup");
  CHECK(events[1]["event"] == "MIGRATION_PASS");
  auto ev = (*c)->wait_event(milliseconds(5000));
  REQUIRE(ev);
  REQUIRE(ev->has_value());
  CHECK((**ev)["data"]["status"] == "pre-switchover");
}

TEST_CASE("an error reply names the command, the class and QEMU's description") {
  FakeMonitor mon([](int fd) {
    handshake(fd);
    std::string cmd = read_line(fd);
    write_line(fd, json{{"error", {{"class", "GenericError"}, {"desc", "Migration is disabled"}}},
                        {"id", id_of(cmd)}}.dump());
    std::string again = read_line(fd);  // the connection stays usable
    write_line(fd, reply(id_of(again), json::array()));
    read_line(fd);
  });
  auto c = QmpClient::connect(mon.path(), milliseconds(5000));
  REQUIRE(c);
  auto r = (*c)->execute("migrate", {{"uri", "tcp:x:1"}});
  REQUIRE_FALSE(r);
  CHECK(r.status().message() == "migrate: GenericError: Migration is disabled");
  CHECK((*c)->usable());
  auto again = (*c)->execute("query-migrate-capabilities");
  REQUIRE(again);
  CHECK(again->is_array());
}

TEST_CASE("a late reply to a command that timed out is not taken for the next one") {
  FakeMonitor mon([](int fd) {
    handshake(fd);
    std::string slow = read_line(fd);
    std::string next = read_line(fd);  // sent after the first timed out
    write_line(fd, reply(id_of(slow), "late"));
    write_line(fd, reply(id_of(next), "mine"));
    read_line(fd);
  });
  auto c = QmpClient::connect(mon.path(), milliseconds(5000));
  REQUIRE(c);
  auto r = (*c)->execute("slow-command", json::object(), milliseconds(100));
  REQUIRE_FALSE(r);
  CHECK(r.status().errno_value() == ETIMEDOUT);
  CHECK((*c)->usable());
  auto r2 = (*c)->execute("query-status");
  REQUIRE(r2);
  CHECK(*r2 == "mine");
}

TEST_CASE("QEMU hanging up fails the command in flight and every later one") {
  FakeMonitor mon([](int fd) {
    handshake(fd);
    read_line(fd);  // and close without a reply, as a QEMU that exits
  });
  auto c = QmpClient::connect(mon.path(), milliseconds(5000));
  REQUIRE(c);
  auto r = (*c)->execute("query-status");
  REQUIRE_FALSE(r);
  CHECK(r.status().message().find("closed the monitor connection") != std::string::npos);
  CHECK_FALSE((*c)->usable());
  auto r2 = (*c)->execute("query-status");
  REQUIRE_FALSE(r2);
  auto ev = (*c)->wait_event(milliseconds(10));
  CHECK_FALSE(ev);
}

TEST_CASE("a zero-timeout wait takes an event that arrived and notices a hang-up") {
  FakeMonitor mon([](int fd) {
    handshake(fd);
    write_line(fd, R"({"event": "STOP", "timestamp": {}})");
  });  // and QEMU exits
  auto c = QmpClient::connect(mon.path(), milliseconds(5000));
  REQUIRE(c);
  std::optional<json> ev;
  for (int i = 0; i < 500 && !ev; ++i) {  // the event may take a moment to arrive
    auto r = (*c)->wait_event(milliseconds(0));
    REQUIRE(r);
    ev = *r;
    if (!ev) std::this_thread::sleep_for(milliseconds(10));
  }
  REQUIRE(ev);
  CHECK((*ev)["event"] == "STOP");
  std::optional<std::string> error;
  for (int i = 0; i < 500 && !error; ++i) {
    auto r = (*c)->wait_event(milliseconds(0));
    if (!r) error = r.status().message();
    else std::this_thread::sleep_for(milliseconds(10));
  }
  REQUIRE(error);
  CHECK(error->find("closed the monitor connection") != std::string::npos);
  CHECK_FALSE((*c)->usable());
}

TEST_CASE("waiting for an event returns nothing after the timeout") {
  FakeMonitor mon([](int fd) {
    handshake(fd);
    read_line(fd);
  });
  auto c = QmpClient::connect(mon.path(), milliseconds(5000));
  REQUIRE(c);
  auto ev = (*c)->wait_event(milliseconds(50));
  REQUIRE(ev);
  CHECK_FALSE(ev->has_value());
  CHECK((*c)->usable());
}

TEST_CASE("a socket that is not a QMP monitor is an error naming it") {
  FakeMonitor mon([](int fd) {
    write_line(fd, R"({"ok": true, "op": "status"})");
    read_line(fd);
  });
  auto c = QmpClient::connect(mon.path(), milliseconds(5000));
  REQUIRE_FALSE(c);
  CHECK(c.status().message().find(mon.path()) != std::string::npos);
  auto missing = QmpClient::connect("/nonexistent/qmp.sock", milliseconds(100));
  REQUIRE_FALSE(missing);
  CHECK(missing.status().message() == "QMP /nonexistent/qmp.sock: No such file or directory");
}
