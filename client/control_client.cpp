#include "client/control_client.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <thread>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <fmt/format.h>

#include "common/control_reply.h"
#include "common/frame_codec.h"
#include "common/json_limits.h"
#include "common/protocol_format.h"

namespace livemig::client {

using nlohmann::json;
using std::chrono::milliseconds;
using Clock = std::chrono::steady_clock;

// ---------------------------------------------------------------- Target

Target Target::remote(HostPort where) {
  Target t;
  t.kind = Kind::Remote;
  t.address = std::move(where);
  return t;
}

Target Target::local(std::string path) {
  Target t;
  t.kind = Kind::Local;
  t.socket_path = std::move(path);
  return t;
}

std::string Target::label() const {
  return kind == Kind::Remote ? address.str() : "socket " + socket_path;
}

std::string Target::peer_address() const { return kind == Kind::Remote ? address.str() : ""; }

// ---------------------------------------------------------------- secret

Result<SecretChoice> choose_secret(const std::string& secret_file, const TlsSettings& tls, std::string* warning) {
  if (warning) warning->clear();
  std::string path = secret_file;
  std::string via = "--secret";
  if (path.empty()) {
    if (const char* env = std::getenv("LIVEMIG_SECRET_FILE"); env && *env) {
      path = env;
      via = "LIVEMIG_SECRET_FILE";
    }
  }
  SecretChoice choice;
  auto use_tls = tls.enabled();
  if (!use_tls) return Status::error("--tls: " + use_tls.status().message());
  if (*use_tls) {
    auto ctx = TlsContext::make(tls);
    if (!ctx) return ctx.status();
    choice.tls = std::move(*ctx);
  }
  if (path.empty()) return choice;  // no key: only a local --socket can be used
  auto secret = load_secret(path, warning);
  if (!secret) return Status::error(fmt::format("{}: {}", via, secret.status().message()), secret.status().errno_value());
  choice.secret = std::move(*secret);
  choice.source = "the key in " + path;
  choice.present = true;
  return choice;
}

// ---------------------------------------------------------------- channels

class ControlClient::Channel {
 public:
  virtual ~Channel() = default;
  // One request line out, one reply line back; errors are for people.
  virtual Result<std::string> exchange(const std::string& request, milliseconds timeout) = 0;
};

namespace {

bool is_protocol_errno(int e) {
  switch (e) {
    case EPROTO: case EILSEQ: case EPROTONOSUPPORT: case EBADRQC: case EMSGSIZE: case EBADMSG: case ENOMSG:
      return true;
    default:
      return false;
  }
}

// PeerLink::connect's "HOST:PORT: why" without the address in front.
std::string strip_address(const std::string& message, const std::string& address) {
  std::string prefix = address + ": ";
  return message.rfind(prefix, 0) == 0 ? message.substr(prefix.size()) : message;
}

// CONTROL frames over the peer port. Owns an io_context and the one thread
// that runs it, as PeerLink requires (connect and call block; they run here,
// on the caller's thread, never on the io thread).
class RemoteChannel final : public ControlClient::Channel {
 public:
  RemoteChannel() : work_(boost::asio::make_work_guard(io_)), thread_([this] { io_.run(); }) {}

  ~RemoteChannel() override {
    if (link_) link_->close(Status::error("migrate-nbd is done", ECONNRESET));
    work_.reset();
    io_.stop();
    thread_.join();
  }

  Status connect(const HostPort& where, const SecretChoice& secret, milliseconds timeout) {
    if (!secret.present)
      return Status::error(fmt::format("no key to authenticate to {}: give --secret FILE or set LIVEMIG_SECRET_FILE "
                                       "(a plugin started without secret= keeps a random key in IMAGE.livemig-key; "
                                       "its status shows the path as secret_file)",
                                       where.str()),
                           EACCES);
    PeerLink::Options opts;
    opts.local_name = "migrate-nbd";
    opts.tls = secret.tls;
    // Long requests (handover, verify) are answered late; heartbeats keep
    // the link alive meanwhile, so a silent peer is still a dead peer.
    auto link = PeerLink::connect(io_, where, secret.secret, kPurposeControl, opts, timeout);
    if (!link) return describe_connect_failure(link.status(), where, secret, timeout);
    link_ = *link;
    link_->start([](const std::shared_ptr<PeerLink>&, PeerLink::Frame&) {},  // only replies matter
                 [](const std::shared_ptr<PeerLink>&, const Status&) {});
    return Status::ok();
  }

  Result<std::string> exchange(const std::string& request, milliseconds timeout) override {
    return control_reply_text(link_->call(ControlPayload{request}, timeout));
  }

 private:
  boost::asio::io_context io_{1};
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_;
  std::thread thread_;
  std::shared_ptr<PeerLink> link_;
};

// The plugin's Unix control socket: a JSON line each way.
class LocalChannel final : public ControlClient::Channel {
 public:
  ~LocalChannel() override {
    if (fd_ >= 0) ::close(fd_);
  }

  Status connect(const std::string& path) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    if (path.size() >= sizeof addr.sun_path)
      return Status::error(fmt::format("control socket path is too long ({} bytes): {}", path.size(), path));
    std::memcpy(addr.sun_path, path.c_str(), path.size() + 1);
    fd_ = ::socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd_ < 0) return Status::error(fmt::format("socket: {}", std::strerror(errno)), errno);
    if (::connect(fd_, reinterpret_cast<const sockaddr*>(&addr), sizeof addr) < 0) {
      int e = errno;
      return Status::error(fmt::format("cannot reach control socket {}: {}", path, std::strerror(e)), e);
    }
    return Status::ok();
  }

  Result<std::string> exchange(const std::string& request, milliseconds timeout) override {
    const auto deadline = Clock::now() + timeout;
    std::string out = request + "\n";
    for (size_t done = 0; done < out.size();) {
      if (Status s = wait(POLLOUT, deadline); !s) return s;
      ssize_t n = ::send(fd_, out.data() + done, out.size() - done, MSG_NOSIGNAL);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return Status::error(fmt::format("sending the request: {}", std::strerror(errno)), errno);
      done += static_cast<size_t>(n);
    }
    for (;;) {
      if (size_t nl = buf_.find('\n'); nl != std::string::npos) {
        std::string line = buf_.substr(0, nl);
        buf_.erase(0, nl + 1);
        return line;
      }
      if (buf_.size() > kMaxReplyBytes) return Status::error("the reply is longer than 64 MiB", EMSGSIZE);
      if (Status s = wait(POLLIN, deadline); !s) return s;
      char chunk[65536];
      ssize_t n = ::recv(fd_, chunk, sizeof chunk, 0);
      if (n < 0 && errno == EINTR) continue;
      if (n < 0) return Status::error(fmt::format("reading the reply: {}", std::strerror(errno)), errno);
      if (n == 0) return Status::error("the plugin closed the control connection without a reply", ECONNRESET);
      buf_.append(chunk, static_cast<size_t>(n));
    }
  }

 private:
  static constexpr size_t kMaxReplyBytes = 64u << 20;

  Status wait(short events, Clock::time_point deadline) {
    for (;;) {
      auto left = std::chrono::duration_cast<milliseconds>(deadline - Clock::now()).count();
      if (left <= 0) return Status::error("no reply in time (see --timeout)", ETIMEDOUT);
      pollfd p{fd_, events, 0};
      int rc = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 1'000'000)));
      if (rc < 0 && errno == EINTR) continue;
      if (rc < 0) return Status::error(fmt::format("poll: {}", std::strerror(errno)), errno);
      if (rc > 0) return Status::ok();
    }
  }

  int fd_ = -1;
  std::string buf_;
};

}  // namespace

// ---------------------------------------------------------------- ControlClient

ControlClient::ControlClient(Target target, std::shared_ptr<const SecretChoice> secret, Timeouts timeouts)
    : target_(std::move(target)), secret_(std::move(secret)), timeouts_(timeouts) {}

ControlClient::~ControlClient() = default;

Status ControlClient::connect() {
  if (channel_) return Status::ok();
  if (target_.kind == Target::Kind::Local) {
    auto ch = std::make_unique<LocalChannel>();
    if (Status s = ch->connect(target_.socket_path); !s) return s;
    channel_ = std::move(ch);
  } else {
    auto ch = std::make_unique<RemoteChannel>();
    if (Status s = ch->connect(target_.address, *secret_, timeouts_.connect); !s) return s;
    channel_ = std::move(ch);
  }
  return Status::ok();
}

Result<json> ControlClient::call_raw(const json& request, std::optional<milliseconds> reply_timeout) {
  if (Status s = connect(); !s) return s;  // the message names the target
  auto text = channel_->exchange(request.dump(), reply_timeout.value_or(timeouts_.reply));
  if (!text) channel_.reset();  // the next call starts on a fresh connection
  return parse_control_reply(text, target_.label());
}

Status describe_connect_failure(const Status& s, const HostPort& where, const SecretChoice& secret,
                                milliseconds timeout) {
  const std::string addr = where.str();
  std::string why = strip_address(s.message(), addr);
  if (s.errno_value() == EKEYREJECTED)
    return Status::error(fmt::format("TLS with {} failed: {}", addr, why), EKEYREJECTED);
  if (s.errno_value() == EACCES)
    return Status::error(fmt::format("authentication failed at {}: wrong secret (this side used {}; the "
                                     "plugin uses its secret= file)",
                                     addr, secret.source),
                         EACCES);
  if (s.errno_value() == ETIMEDOUT)
    return Status::error(fmt::format("cannot reach {}: no answer within {:.3g} s", addr, timeout.count() / 1000.0),
                         ETIMEDOUT);
  if (is_protocol_errno(s.errno_value()))
    return Status::error(fmt::format("cannot talk to {}: it does not speak the livemig peer protocol ({})", addr, why),
                         s.errno_value());
  return Status::error(fmt::format("cannot reach {}: {}", addr, why), s.errno_value());
}

Result<json> ControlClient::call(const json& request, std::optional<milliseconds> reply_timeout) {
  auto reply = call_raw(request, reply_timeout);
  if (!reply) return reply;
  if (reply->value("ok", false) != true) {
    std::string error = reply->contains("error") && (*reply)["error"].is_string()
                            ? (*reply)["error"].get<std::string>()
                            : "the plugin refused the request without saying why";
    return Status::error(fmt::format("{}: {}", target_.label(), error), EIO);
  }
  return reply;
}

}  // namespace livemig::client
