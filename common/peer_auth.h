// Mutual authentication of two livemig peers with a pre-shared key (PSK):
// HMAC-SHA256 challenge-response, after the HELLO/AUTH frames of
// docs/protocol.md. Pure logic: no sockets, no threads; the connection code
// moves the values below in and out of frames.
//
//   client -> server  HELLO   { nonce_c }
//   server -> client  HELLO   { nonce_s }
//   client -> server  AUTH    { mac_c = HMAC-SHA256(K, "livemig-v2 client" || nonce_s || nonce_c) }
//   server            verifies mac_c (the client knows K and answered *this* nonce_s)
//   server -> client  AUTH_OK { mac_s = HMAC-SHA256(K, "livemig-v2 server" || nonce_c || nonce_s) }
//   client            verifies mac_s (the server knows K and answered *this* nonce_c)
//
// The labels are the ASCII bytes shown, without a terminating NUL; the nonces
// are 32 random bytes each. Why this is safe against the obvious attacks:
//   - offline guessing: the server sends nothing that depends on K before the
//     client has proven it holds K, so a stranger who connects learns
//     nothing to test guesses of a weak passphrase against;
//   - replay: every session has a fresh server nonce, so an AUTH recorded from
//     an earlier session does not verify;
//   - reflection: the two MACs use different labels and nonce orders, so a
//     peer's own MAC sent back to it never verifies as the other side's;
//   - timing: MACs are compared with CRYPTO_memcmp (constant time).
// (A client that connects to a rogue server does reveal mac_c to it: point
// clients at the right address, or use TLS, which authenticates the server
// first.)
// The key never crosses the wire. Without TLS the session after the handshake
// is not encrypted or integrity-protected: authentication only keeps
// strangers from driving or feeding a migration.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace livemig {

using Nonce = std::array<uint8_t, 32>;
using Mac = std::array<uint8_t, 32>;  // HMAC-SHA256 output

// The pre-shared key. Every copy wipes its bytes (OPENSSL_cleanse) when it is
// destroyed; a moved-from Secret is empty.
class Secret {
 public:
  static constexpr size_t kMinBytes = 16;
  static constexpr size_t kMaxBytes = 64 * 1024;

  Secret() = default;
  Secret(const Secret& other) : bytes_(other.bytes_) {}
  Secret(Secret&& other) noexcept;
  Secret& operator=(const Secret& other);
  Secret& operator=(Secret&& other) noexcept;
  ~Secret();

  // A secret from raw bytes; an error if it is empty, shorter than kMinBytes
  // or longer than kMaxBytes. `what` names the source in the message.
  static Result<Secret> from_bytes(std::string_view bytes, const std::string& what = "secret");

  const uint8_t* data() const { return bytes_.data(); }
  size_t size() const { return bytes_.size(); }
  bool empty() const { return bytes_.empty(); }

 private:
  void wipe();
  std::vector<uint8_t> bytes_;
};

// Reads the key file at `path`. One trailing newline ("\n" or "\r\n") is
// trimmed; every other byte is key. Errors name the path: missing or
// unreadable file, not a regular file, empty key, key shorter than 16 bytes,
// file larger than 64 KiB. If the file is readable by group or others, the
// secret is still returned and, when `warning` is not null, *warning is set to
// a message for the log (otherwise it is cleared).
Result<Secret> load_secret(const std::string& path, std::string* warning = nullptr);

// The key in `path`, made first if the file does not exist: 32 random
// bytes written as 64 hex digits and a newline, in a new file of mode 0600
// (O_EXCL: an existing file is never replaced). *created tells which.
// Who can read the file can control the plugin that uses it; nobody else.
// Errors name the path.
Result<Secret> load_or_create_secret(const std::string& path, bool* created, std::string* warning = nullptr);

// 32 bytes from OpenSSL's CSPRNG. Aborts the process if the CSPRNG fails: a
// predictable nonce would defeat the handshake, and there is no safe fallback.
Nonce random_nonce();

// HMAC-SHA256(K, "livemig-v1 server" || client || server): what the server
// sends to prove it holds K.
Mac server_mac(const Secret& key, const Nonce& client, const Nonce& server);
// HMAC-SHA256(K, "livemig-v1 client" || server || client): what the client
// sends to prove it holds K.
Mac client_mac(const Secret& key, const Nonce& client, const Nonce& server);
// HMAC-SHA256(key, data), the primitive under both.
Mac hmac_sha256(const uint8_t* key, size_t key_len, const uint8_t* data, size_t data_len);
// Constant-time equality of two MACs.
bool mac_equal(const Mac& a, const Mac& b);

// The server's side of one handshake (one per connection). Steps in order:
// on_hello, then on_auth once. A step out of order returns an error and
// changes nothing; after a failed on_auth the session stays unauthenticated
// and every later step fails.
class AuthServer {
 public:
  // Keeps its own copy of the key.
  explicit AuthServer(const Secret& key);

  // Takes the client's HELLO; returns the nonce of the server HELLO to send.
  // An error if called twice.
  Result<Nonce> on_hello(const Nonce& client_nonce);
  // Checks the client's AUTH. Ok: the client holds the key, and the result
  // is the server's MAC for AUTH_OK. Error "authentication failed: wrong
  // secret" (EACCES) otherwise, or an error if on_hello has not run or
  // on_auth already ran.
  Result<Mac> on_auth(const Mac& client_mac);
  // True once on_auth has succeeded.
  bool authenticated() const { return state_ == State::kAuthenticated; }

 private:
  enum class State { kStart, kHelloSent, kAuthenticated, kFailed };
  Secret key_;
  State state_ = State::kStart;
  Nonce client_nonce_{};
  Nonce server_nonce_{};
};

// The client's side of one handshake. Steps in order: hello,
// on_server_hello, on_auth_ok. A step out of order returns an error and
// changes nothing; after a failed step every later step fails.
class AuthClient {
 public:
  // Keeps its own copy of the key.
  explicit AuthClient(const Secret& key);

  // The client HELLO to send (a fresh nonce). An error if called twice.
  Result<Nonce> hello();
  // Takes the server's HELLO; returns the client's MAC for AUTH. Error
  // (EACCES) if the server echoed our own nonce (a mirror, not a peer), or
  // an error if hello() has not run or this already ran.
  Result<Mac> on_server_hello(const Nonce& server_nonce);
  // Checks the server's MAC from AUTH_OK. Error "server failed
  // authentication (wrong secret or not a livemig peer)" (EACCES) if it
  // does not verify, or an error if on_server_hello has not succeeded or
  // this already ran.
  Status on_auth_ok(const Mac& server_mac);
  // True once on_auth_ok has succeeded (the server proved it holds the key).
  bool server_authenticated() const { return state_ == State::kServerVerified; }

 private:
  enum class State { kStart, kHelloSent, kAuthSent, kServerVerified, kFailed };
  Secret key_;
  State state_ = State::kStart;
  Nonce client_nonce_{};
  Nonce server_nonce_{};
};

}  // namespace livemig
