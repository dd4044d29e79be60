// TLS 1.3 on the peer link (issue #13): mutual, with the credentials
// operators already keep for QEMU and nbdkit:
//
//   x509  a directory laid out as QEMU's and libvirt's tls-creds-x509:
//         ca-cert.pem (the CA that signed the peers), server-cert.pem and
//         server-key.pem (presented when this side accepts), client-cert.pem
//         and client-key.pem (presented when it connects). Each side checks
//         the other's certificate against ca-cert.pem; a connecting side also
//         checks that the certificate names the host or IP it dialled.
//   psk   a file in nbdkit's --tls-psk format: one "identity:hexkey" line per
//         identity (the key in hex, at least 16 bytes). The accepting side
//         takes any identity in its file; the connecting side uses the first
//         line's (or tls-psk-identity=). The file must not be readable by
//         group or others.
//
// TLS 1.3 only. Under TLS the livemig handshake (HMAC with secret=) still
// runs, inside the encrypted channel; so do the frames' CRC-32Cs (a cheap
// check of our own framing, measured in tests/bench).
#pragma once

#include <memory>
#include <string>
#include <vector>

#include <boost/asio/ssl/context.hpp>

#include "common/status.h"

namespace livemig {

enum class TlsMode {
  Auto,  // on when credentials are given (and required for a non-loopback listen=)
  On,    // required
  Off,   // plaintext, said explicitly (logged as a warning where TLS is expected)
};
const char* tls_mode_name(TlsMode m);
Result<TlsMode> parse_tls_mode(const std::string& s);

struct TlsSettings {
  TlsMode mode = TlsMode::Auto;
  std::string certificates;  // x509 directory
  std::string psk_file;      // nbdkit --tls-psk file
  std::string psk_identity;  // the identity a connecting side uses (default: the file's first)

  bool has_credentials() const { return !certificates.empty() || !psk_file.empty(); }
  // Whether links use TLS under these settings. Errors: tls=on without
  // credentials, both kinds of credentials at once.
  Result<bool> enabled() const;
};

struct PskEntry {
  std::string identity;
  std::vector<unsigned char> key;
};
// Reads an nbdkit --tls-psk file. Errors name the path and the line: not
// "identity:hex", an odd or non-hex key, a key under 16 bytes, a duplicate
// identity, an empty file, or a file readable by group or others.
Result<std::vector<PskEntry>> load_psk_file(const std::string& path);

class TlsContext {
 public:
  // Loads the credentials and builds the server and client contexts. Errors
  // name the file and what is wrong with it (missing, unreadable, not a
  // certificate or key, a key that does not match its certificate).
  static Result<std::shared_ptr<TlsContext>> make(const TlsSettings& settings);
  ~TlsContext();

  boost::asio::ssl::context& server() { return server_; }
  boost::asio::ssl::context& client() { return client_; }
  bool x509() const { return psk_.empty(); }
  // "x509 (DIR)" or "psk (IDENTITY, N identities)".
  std::string describe() const;
  // The PSK a connecting side uses, and the one an accepting side finds for
  // `identity` (null if none).
  const PskEntry* client_psk() const;
  const PskEntry* find_psk(const std::string& identity) const;

 private:
  TlsContext();
  Status load_x509(const std::string& dir);
  Status load_psk(const TlsSettings& settings);

  boost::asio::ssl::context server_;
  boost::asio::ssl::context client_;
  std::string source_;
  std::vector<PskEntry> psk_;
  size_t client_psk_ = 0;
};

// Why a TLS handshake failed, for people: the certificate check's verdict
// when there is one ("certificate has expired", "self-signed certificate",
// ...), a plaintext peer named as such, else OpenSSL's reason.
std::string describe_tls_failure(const boost::system::error_code& ec, long verify_result);

}  // namespace livemig
