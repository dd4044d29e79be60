#include "common/peer_auth.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

namespace livemig {

namespace {

constexpr std::string_view kServerLabel = "livemig-v2 server";
constexpr std::string_view kClientLabel = "livemig-v2 client";

// HMAC-SHA256(key, label || a || b).
Mac labelled_mac(const Secret& key, std::string_view label, const Nonce& a, const Nonce& b) {
  std::array<uint8_t, 64 + 2 * sizeof(Nonce)> msg{};
  static_assert(kServerLabel.size() <= 64 && kClientLabel.size() <= 64);
  size_t n = 0;
  std::memcpy(msg.data() + n, label.data(), label.size());
  n += label.size();
  std::memcpy(msg.data() + n, a.data(), a.size());
  n += a.size();
  std::memcpy(msg.data() + n, b.data(), b.size());
  n += b.size();
  return hmac_sha256(key.data(), key.size(), msg.data(), n);
}

Status out_of_order(const char* what) {
  return Status::error(std::string("authentication: ") + what, EPROTO);
}

// Wipes a std::string's buffer (including unused capacity) before it is freed.
void cleanse(std::string& s) {
  if (s.capacity() > 0) OPENSSL_cleanse(s.data(), s.capacity());
  s.clear();
}

}  // namespace

// ---- Secret ----

Secret::Secret(Secret&& other) noexcept : bytes_(std::move(other.bytes_)) { other.bytes_.clear(); }

Secret& Secret::operator=(const Secret& other) {
  if (this != &other) {
    wipe();
    bytes_ = other.bytes_;
  }
  return *this;
}

Secret& Secret::operator=(Secret&& other) noexcept {
  if (this != &other) {
    wipe();
    bytes_ = std::move(other.bytes_);
    other.bytes_.clear();
  }
  return *this;
}

Secret::~Secret() { wipe(); }

void Secret::wipe() {
  if (bytes_.capacity() > 0) OPENSSL_cleanse(bytes_.data(), bytes_.capacity());
  bytes_.clear();
}

Result<Secret> Secret::from_bytes(std::string_view bytes, const std::string& what) {
  if (bytes.empty()) return Status::error(what + ": the key is empty", EINVAL);
  if (bytes.size() < kMinBytes)
    return Status::error(what + ": the key is " + std::to_string(bytes.size()) + " bytes; at least " +
                             std::to_string(kMinBytes) + " are required",
                         EINVAL);
  if (bytes.size() > kMaxBytes)
    return Status::error(what + ": the key is longer than " + std::to_string(kMaxBytes) + " bytes", EINVAL);
  Secret s;
  s.bytes_.assign(bytes.begin(), bytes.end());
  return s;
}

Result<Secret> load_secret(const std::string& path, std::string* warning) {
  if (warning) warning->clear();
  const std::string what = "secret file " + path;
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC | O_NOCTTY);
  if (fd < 0) return Status::error(what + ": " + std::strerror(errno), errno);
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int e = errno;
    ::close(fd);
    return Status::error(what + ": fstat: " + std::strerror(e), e);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return Status::error(what + ": not a regular file", EINVAL);
  }
  if (static_cast<uint64_t>(st.st_size) > Secret::kMaxBytes + 2) {
    ::close(fd);
    return Status::error(what + ": the key is longer than " + std::to_string(Secret::kMaxBytes) + " bytes",
                         EINVAL);
  }

  // Read at most kMaxBytes + 3 bytes, so that an over-long file (one that
  // grew after fstat) is still caught, into a buffer wiped afterwards.
  std::string buf;
  buf.resize(Secret::kMaxBytes + 3);
  size_t got = 0;
  while (got < buf.size()) {
    ssize_t r = ::read(fd, buf.data() + got, buf.size() - got);
    if (r < 0) {
      if (errno == EINTR) continue;
      int e = errno;
      ::close(fd);
      cleanse(buf);
      return Status::error(what + ": read: " + std::strerror(e), e);
    }
    if (r == 0) break;
    got += static_cast<size_t>(r);
  }
  ::close(fd);

  size_t len = got;
  if (len > 0 && buf[len - 1] == '\n') {
    --len;
    if (len > 0 && buf[len - 1] == '\r') --len;
  }
  Result<Secret> secret = Secret::from_bytes(std::string_view(buf.data(), len), what);
  cleanse(buf);
  if (!secret) return secret;

  if (warning && (st.st_mode & (S_IRGRP | S_IROTH))) {
    char mode[8];
    std::snprintf(mode, sizeof mode, "%04o", static_cast<unsigned>(st.st_mode & 07777));
    *warning = what + " is readable by group or others (mode " + mode + "); run chmod 600 on it";
  }
  return secret;
}

Result<Secret> load_or_create_secret(const std::string& path, bool* created, std::string* warning) {
  *created = false;
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0 && errno != EEXIST)
    return Status::error("key file " + path + ": cannot create it: " + std::strerror(errno), errno);
  if (fd >= 0) {
    Nonce bytes = random_nonce();
    static const char* digits = "0123456789abcdef";
    std::string text;
    for (uint8_t b : bytes) {
      text += digits[b >> 4];
      text += digits[b & 15];
    }
    text += '\n';
    bool ok = ::write(fd, text.data(), text.size()) == static_cast<ssize_t>(text.size()) && ::fsync(fd) == 0;
    int e = errno;
    ::close(fd);
    cleanse(text);
    if (!ok) {
      ::unlink(path.c_str());
      return Status::error("key file " + path + ": writing it: " + std::strerror(e), e);
    }
    *created = true;
  }
  return load_secret(path, warning);
}

// ---- primitives ----

Nonce random_nonce() {
  Nonce n;
  if (RAND_bytes(n.data(), static_cast<int>(n.size())) != 1) {
    std::fputs("livemig: RAND_bytes failed; cannot make an authentication nonce\n", stderr);
    std::abort();
  }
  return n;
}

Mac hmac_sha256(const uint8_t* key, size_t key_len, const uint8_t* data, size_t data_len) {
  Mac out{};
  unsigned int out_len = 0;
  // HMAC() only fails on allocation failure or a bad digest; a zero MAC
  // would then simply never verify against the peer's.
  if (HMAC(EVP_sha256(), key, static_cast<int>(key_len), data, data_len, out.data(), &out_len) == nullptr ||
      out_len != out.size()) {
    out.fill(0);
  }
  return out;
}

bool mac_equal(const Mac& a, const Mac& b) { return CRYPTO_memcmp(a.data(), b.data(), a.size()) == 0; }

Mac server_mac(const Secret& key, const Nonce& client, const Nonce& server) {
  return labelled_mac(key, kServerLabel, client, server);
}

Mac client_mac(const Secret& key, const Nonce& client, const Nonce& server) {
  return labelled_mac(key, kClientLabel, server, client);
}

// ---- AuthServer ----

AuthServer::AuthServer(const Secret& key) : key_(key) {}

Result<Nonce> AuthServer::on_hello(const Nonce& client_nonce) {
  if (state_ != State::kStart) return out_of_order("HELLO received twice");
  client_nonce_ = client_nonce;
  server_nonce_ = random_nonce();
  state_ = State::kHelloSent;
  return server_nonce_;
}

Result<Mac> AuthServer::on_auth(const Mac& mac) {
  switch (state_) {
    case State::kStart:
      return out_of_order("AUTH received before HELLO");
    case State::kAuthenticated:
    case State::kFailed:
      return out_of_order("AUTH received twice");
    case State::kHelloSent:
      break;
  }
  if (!mac_equal(mac, client_mac(key_, client_nonce_, server_nonce_))) {
    state_ = State::kFailed;
    return Status::error("authentication failed: wrong secret", EACCES);
  }
  state_ = State::kAuthenticated;
  return server_mac(key_, client_nonce_, server_nonce_);
}

// ---- AuthClient ----

AuthClient::AuthClient(const Secret& key) : key_(key) {}

Result<Nonce> AuthClient::hello() {
  if (state_ != State::kStart) return out_of_order("HELLO already sent");
  client_nonce_ = random_nonce();
  state_ = State::kHelloSent;
  return client_nonce_;
}

Result<Mac> AuthClient::on_server_hello(const Nonce& server_nonce) {
  switch (state_) {
    case State::kStart:
      return out_of_order("server HELLO received before the client HELLO was sent");
    case State::kAuthSent:
    case State::kServerVerified:
    case State::kFailed:
      return out_of_order("server HELLO received twice");
    case State::kHelloSent:
      break;
  }
  // A server that echoes our nonce is a mirror, not a peer: it would have us
  // compute the MAC it needs for another session.
  if (CRYPTO_memcmp(server_nonce.data(), client_nonce_.data(), server_nonce.size()) == 0) {
    state_ = State::kFailed;
    return Status::error("server failed authentication (it echoed our nonce: not a livemig peer)", EACCES);
  }
  server_nonce_ = server_nonce;
  state_ = State::kAuthSent;
  return client_mac(key_, client_nonce_, server_nonce_);
}

Status AuthClient::on_auth_ok(const Mac& mac) {
  switch (state_) {
    case State::kStart:
    case State::kHelloSent:
      return out_of_order("AUTH_OK received before AUTH was sent");
    case State::kServerVerified:
    case State::kFailed:
      return out_of_order("AUTH_OK received twice");
    case State::kAuthSent:
      break;
  }
  if (!mac_equal(mac, server_mac(key_, client_nonce_, server_nonce_))) {
    state_ = State::kFailed;
    return Status::error("server failed authentication (wrong secret or not a livemig peer)", EACCES);
  }
  state_ = State::kServerVerified;
  return Status::ok();
}

}  // namespace livemig
