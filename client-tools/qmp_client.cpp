#include "client-tools/qmp_client.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>

#include <fmt/format.h>

#include "common/json_limits.h"

namespace livemig::qmp {

using nlohmann::json;
using Clock = std::chrono::steady_clock;

namespace {

// A QMP line longer than this is not from QEMU (query replies are a few KiB).
constexpr size_t kMaxLineBytes = 16u << 20;
constexpr int kMaxQmpJsonDepth = 256;

std::string errno_text(int e) { return std::strerror(e); }

}  // namespace

Message parse_message(const std::string& line) {
  Message m;
  // QEMU's replies nest deeper than a peer's requests may (a backing chain
  // nests an image per level), so a looser limit, still far from the stack's.
  json j = parse_json_object(line, kMaxQmpJsonDepth);
  if (j.is_discarded()) {
    m.error = fmt::format("not a JSON object: {:.120}", line);
    return m;
  }
  m.body = j;
  if (auto id = j.find("id"); id != j.end()) m.id = *id;
  if (j.contains("QMP")) {
    m.kind = Message::Kind::Greeting;
  } else if (j.contains("return")) {
    m.kind = Message::Kind::Return;
  } else if (auto e = j.find("error"); e != j.end()) {
    m.kind = Message::Kind::Error;
    std::string cls = e->is_object() ? e->value("class", std::string("GenericError")) : "GenericError";
    std::string desc = e->is_object() ? e->value("desc", std::string()) : e->dump();
    m.error = cls + ": " + desc;
  } else if (auto ev = j.find("event"); ev != j.end() && ev->is_string()) {
    m.kind = Message::Kind::Event;
    m.event = ev->get<std::string>();
  } else {
    m.body = nullptr;
    m.error = fmt::format("neither a reply nor an event: {:.120}", line);
  }
  return m;
}

QmpClient::~QmpClient() {
  if (fd_ >= 0) ::close(fd_);
}

Result<std::unique_ptr<QmpClient>> QmpClient::connect(const std::string& path, Ms timeout) {
  const std::string who = "QMP " + path;
  sockaddr_un addr{};
  addr.sun_family = AF_UNIX;
  if (path.size() >= sizeof addr.sun_path)
    return Status::error(fmt::format("{}: the socket path is too long ({} bytes)", who, path.size()), ENAMETOOLONG);
  std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
  int fd = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return Status::error(fmt::format("{}: socket: {}", who, errno_text(errno)), errno);
  if (::connect(fd, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) < 0) {
    int e = errno;
    ::close(fd);
    return Status::error(fmt::format("{}: {}", who, errno_text(e)), e);
  }
  std::unique_ptr<QmpClient> c(new QmpClient(fd, path));
  const auto deadline = Clock::now() + timeout;
  auto first = c->read_message(deadline);
  if (!first) return first.status();
  if (first->kind != Message::Kind::Greeting)
    return Status::error(fmt::format("{}: no QMP greeting (is it a QMP socket, and is another client attached?)", who),
                         EPROTO);
  c->greeting_ = first->body["QMP"];
  auto caps = c->execute("qmp_capabilities", json::object(), timeout);
  if (!caps) return caps.status();
  return c;
}

Status QmpClient::fail(Status s) {
  if (broken_.is_ok()) broken_ = Status::error(fmt::format("QMP {}: {}", path_, s.message()), s.errno_value());
  return broken_;
}

Status QmpClient::send_line(const std::string& line, Clock::time_point deadline) {
  std::string out = line + "\n";
  for (size_t done = 0; done < out.size();) {
    auto left = std::chrono::duration_cast<Ms>(deadline - Clock::now()).count();
    if (left <= 0) return fail(Status::error("timed out sending a command", ETIMEDOUT));
    pollfd p{fd_, POLLOUT, 0};
    int rc = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 1'000'000)));
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) return fail(Status::error("poll: " + errno_text(errno), errno));
    if (rc == 0) continue;
    ssize_t n = ::send(fd_, out.data() + done, out.size() - done, MSG_NOSIGNAL);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n < 0) return fail(Status::error("sending a command: " + errno_text(errno), errno));
    done += static_cast<size_t>(n);
  }
  return Status::ok();
}

Result<Message> QmpClient::read_message(Clock::time_point deadline) {
  if (!usable()) return broken_.is_ok() ? Status::error("QMP " + path_ + ": not connected", ENOTCONN) : broken_;
  for (;;) {
    if (size_t nl = buf_.find('\n'); nl != std::string::npos) {
      std::string line = buf_.substr(0, nl);
      buf_.erase(0, nl + 1);
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      Message m = parse_message(line);
      if (m.kind == Message::Kind::Invalid) return fail(Status::error(m.error, EPROTO));
      return m;
    }
    if (buf_.size() > kMaxLineBytes) return fail(Status::error("a line longer than 16 MiB", EMSGSIZE));
    // Poll even when the deadline has passed, so that a zero timeout still
    // takes what is there (and notices a hang-up).
    auto left = std::max<int64_t>(0, std::chrono::duration_cast<Ms>(deadline - Clock::now()).count());
    pollfd p{fd_, POLLIN, 0};
    int rc = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 1'000'000)));
    if (rc < 0 && errno == EINTR) continue;
    if (rc < 0) return fail(Status::error("poll: " + errno_text(errno), errno));
    if (rc == 0) {
      if (Clock::now() < deadline) continue;
      return Status::error(fmt::format("QMP {}: no answer in time", path_), ETIMEDOUT);
    }
    char chunk[65536];
    ssize_t n = ::recv(fd_, chunk, sizeof chunk, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n < 0) return fail(Status::error("reading: " + errno_text(errno), errno));
    if (n == 0) return fail(Status::error("QEMU closed the monitor connection (did it exit?)", ECONNRESET));
    buf_.append(chunk, static_cast<size_t>(n));
  }
}

Result<json> QmpClient::execute(const std::string& command, const json& arguments, Ms timeout) {
  const auto deadline = Clock::now() + timeout;
  const uint64_t id = next_id_++;
  json req = {{"execute", command}, {"id", id}};
  if (!arguments.empty()) req["arguments"] = arguments;
  if (!usable()) return Status::error(fmt::format("{}: {}", command, broken_.message()), broken_.errno_value());
  if (Status s = send_line(req.dump(), deadline); !s) return Status::error(command + ": " + s.message(), s.errno_value());
  for (;;) {
    auto m = read_message(deadline);
    if (!m) {
      // A timed-out command leaves its reply in flight; the id drops it later.
      return Status::error(fmt::format("{}: {}", command, m.status().message()), m.status().errno_value());
    }
    switch (m->kind) {
      case Message::Kind::Event:
        events_.push_back(std::move(m->body));
        continue;
      case Message::Kind::Greeting:
        continue;
      case Message::Kind::Return:
      case Message::Kind::Error:
        if (m->id != json(id)) continue;  // the late reply of an earlier command
        if (m->kind == Message::Kind::Error)
          return Status::error(fmt::format("{}: {}", command, m->error), EIO);
        return m->body["return"];
      case Message::Kind::Invalid:
        break;
    }
  }
}

Result<std::optional<json>> QmpClient::wait_event(Ms timeout) {
  const auto deadline = Clock::now() + timeout;
  while (events_.empty()) {
    auto m = read_message(deadline);
    if (!m) {
      if (m.status().errno_value() == ETIMEDOUT && usable()) return std::optional<json>();
      return m.status();
    }
    if (m->kind == Message::Kind::Event) events_.push_back(std::move(m->body));
    // A reply here belongs to a command that timed out earlier: dropped.
  }
  json e = std::move(events_.front());
  events_.pop_front();
  return std::optional<json>(std::move(e));
}

std::deque<json> QmpClient::take_events() {
  std::deque<json> out;
  out.swap(events_);
  return out;
}

}  // namespace livemig::qmp
