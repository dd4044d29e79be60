#include "common/tls_context.h"

#include <sys/stat.h>

#include <cctype>
#include <cstring>
#include <fstream>
#include <set>

#include <boost/asio/ssl/error.hpp>
#include <fmt/format.h>
#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>

#include "common/enum_names.h"

namespace livemig {
namespace ssl = boost::asio::ssl;

namespace {

constexpr size_t kMinPskBytes = 16;
// An ex_data slot of our own on each SSL_CTX, for its TlsContext (the PSK
// callbacks look it up). Not the "app data" slot: Boost.Asio's context keeps
// its verify callback there, and deletes what it finds.
int context_index() {
  static const int index = SSL_CTX_get_ex_new_index(0, nullptr, nullptr, nullptr, nullptr);
  return index;
}
TlsContext* context_of(SSL* ssl) {
  return static_cast<TlsContext*>(SSL_CTX_get_ex_data(SSL_get_SSL_CTX(ssl), context_index()));
}

unsigned int psk_server_callback(SSL* ssl, const char* identity, unsigned char* psk, unsigned int max_psk_len) {
  const PskEntry* e = context_of(ssl)->find_psk(identity ? identity : "");
  if (!e || e->key.size() > max_psk_len) return 0;  // unknown identity: the handshake fails
  std::memcpy(psk, e->key.data(), e->key.size());
  return static_cast<unsigned int>(e->key.size());
}

unsigned int psk_client_callback(SSL* ssl, const char*, char* identity, unsigned int max_identity_len,
                                 unsigned char* psk, unsigned int max_psk_len) {
  const PskEntry* e = context_of(ssl)->client_psk();
  if (!e || e->identity.size() + 1 > max_identity_len || e->key.size() > max_psk_len) return 0;
  std::memcpy(identity, e->identity.c_str(), e->identity.size() + 1);
  std::memcpy(psk, e->key.data(), e->key.size());
  return static_cast<unsigned int>(e->key.size());
}

// The last OpenSSL error, for a message.
std::string openssl_error() {
  unsigned long e = ERR_peek_last_error();
  ERR_clear_error();
  if (e == 0) return "unknown error";
  char buf[256];
  ERR_error_string_n(e, buf, sizeof buf);
  const char* reason = ERR_reason_error_string(e);
  return reason ? reason : buf;
}

void tls13_only(ssl::context& c) {
  SSL_CTX_set_min_proto_version(c.native_handle(), TLS1_3_VERSION);
  SSL_CTX_set_max_proto_version(c.native_handle(), TLS1_3_VERSION);
}

Status check_private(const std::string& path, const std::string& what) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0) return Status::error(fmt::format("{} {}: {}", what, path, std::strerror(errno)), errno);
  if (!S_ISREG(st.st_mode)) return Status::error(fmt::format("{} {}: not a regular file", what, path), EINVAL);
  if (st.st_mode & (S_IRWXG | S_IRWXO))
    return Status::error(fmt::format("{} {}: readable by group or others (mode {:04o}); run chmod 600 on it", what,
                                     path, st.st_mode & 07777),
                         EACCES);
  return Status::ok();
}

Result<std::vector<unsigned char>> parse_hex(const std::string& hex) {
  if (hex.empty() || hex.size() % 2) return Status::error("the key is not an even number of hex digits");
  std::vector<unsigned char> out;
  for (size_t i = 0; i < hex.size(); i += 2) {
    if (!std::isxdigit(static_cast<unsigned char>(hex[i])) || !std::isxdigit(static_cast<unsigned char>(hex[i + 1])))
      return Status::error("the key is not hex");
    out.push_back(static_cast<unsigned char>(std::stoi(hex.substr(i, 2), nullptr, 16)));
  }
  if (out.size() < kMinPskBytes) return Status::error(fmt::format("the key is {} bytes, at least {} are needed",
                                                                  out.size(), kMinPskBytes));
  return out;
}

}  // namespace

const char* tls_mode_name(TlsMode m) {
  switch (m) {
    case TlsMode::Auto: return "auto";
    case TlsMode::On: return "on";
    case TlsMode::Off: return "off";
  }
  return "?";
}

Result<TlsMode> parse_tls_mode(const std::string& s) {
  constexpr TlsMode kAll[] = {TlsMode::Auto, TlsMode::On, TlsMode::Off};
  if (auto m = enum_by_name(s, kAll, tls_mode_name)) return *m;
  return Status::error(fmt::format("tls={}: expected auto, on or off", s));
}

Result<bool> TlsSettings::enabled() const {
  if (!certificates.empty() && !psk_file.empty())
    return Status::error("give tls-certificates= or tls-psk=, not both");
  if (mode == TlsMode::Off) return false;
  if (mode == TlsMode::On && !has_credentials())
    return Status::error("tls=on needs credentials: tls-certificates=DIR (x509) or tls-psk=FILE");
  return has_credentials();
}

Result<std::vector<PskEntry>> load_psk_file(const std::string& path) {
  if (Status s = check_private(path, "tls-psk file"); !s) return s;
  std::ifstream in(path);
  if (!in) return Status::error(fmt::format("tls-psk file {}: cannot read it", path), EIO);
  std::vector<PskEntry> out;
  std::set<std::string> seen;
  std::string line;
  for (int n = 1; std::getline(in, line); ++n) {
    while (!line.empty() && (line.back() == '\r' || line.back() == ' ')) line.pop_back();
    if (line.empty()) continue;
    auto colon = line.find(':');
    if (colon == std::string::npos || colon == 0)
      return Status::error(fmt::format("tls-psk file {} line {}: expected IDENTITY:HEXKEY", path, n));
    PskEntry e{line.substr(0, colon), {}};
    auto key = parse_hex(line.substr(colon + 1));
    OPENSSL_cleanse(line.data(), line.size());
    if (!key) return Status::error(fmt::format("tls-psk file {} line {}: {}", path, n, key.status().message()));
    if (!seen.insert(e.identity).second)
      return Status::error(fmt::format("tls-psk file {} line {}: identity '{}' appears twice", path, n, e.identity));
    e.key = std::move(*key);
    out.push_back(std::move(e));
  }
  if (out.empty()) return Status::error(fmt::format("tls-psk file {}: no IDENTITY:HEXKEY line", path));
  return out;
}

TlsContext::TlsContext() : server_(ssl::context::tls_server), client_(ssl::context::tls_client) {
  for (ssl::context* c : {&server_, &client_}) {
    tls13_only(*c);
    SSL_CTX_set_ex_data(c->native_handle(), context_index(), this);
  }
}

TlsContext::~TlsContext() {
  for (PskEntry& e : psk_) OPENSSL_cleanse(e.key.data(), e.key.size());
}

Result<std::shared_ptr<TlsContext>> TlsContext::make(const TlsSettings& settings) {
  std::shared_ptr<TlsContext> t(new TlsContext());
  Status s = settings.certificates.empty() ? t->load_psk(settings) : t->load_x509(settings.certificates);
  if (!s) return s;
  return t;
}

Status TlsContext::load_x509(const std::string& dir) {
  source_ = fmt::format("x509 ({})", dir);
  auto file = [&](const char* name) { return dir + "/" + name; };
  ERR_clear_error();
  struct Load {
    ssl::context& ctx;
    const char* cert;
    const char* key;
  };
  for (const Load& l : {Load{server_, "server-cert.pem", "server-key.pem"}, Load{client_, "client-cert.pem",
                                                                                  "client-key.pem"}}) {
    SSL_CTX* c = l.ctx.native_handle();
    if (Status s = check_private(file(l.key), "tls-certificates key"); !s) return s;
    if (SSL_CTX_use_certificate_chain_file(c, file(l.cert).c_str()) != 1)
      return Status::error(fmt::format("tls-certificates: {}: {}", file(l.cert), openssl_error()), EINVAL);
    if (SSL_CTX_use_PrivateKey_file(c, file(l.key).c_str(), SSL_FILETYPE_PEM) != 1)
      return Status::error(fmt::format("tls-certificates: {}: {}", file(l.key), openssl_error()), EINVAL);
    if (SSL_CTX_check_private_key(c) != 1)
      return Status::error(fmt::format("tls-certificates: {} does not match {}", file(l.key), file(l.cert)), EINVAL);
    if (SSL_CTX_load_verify_locations(c, file("ca-cert.pem").c_str(), nullptr) != 1)
      return Status::error(fmt::format("tls-certificates: {}: {}", file("ca-cert.pem"), openssl_error()), EINVAL);
    // Mutual: each side must present a certificate the CA signed.
    SSL_CTX_set_verify(c, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  }
  return Status::ok();
}

Status TlsContext::load_psk(const TlsSettings& settings) {
  auto entries = load_psk_file(settings.psk_file);
  if (!entries) return entries.status();
  psk_ = std::move(*entries);
  client_psk_ = 0;
  if (!settings.psk_identity.empty()) {
    auto it = std::find_if(psk_.begin(), psk_.end(), [&](auto& e) { return e.identity == settings.psk_identity; });
    if (it == psk_.end())
      return Status::error(fmt::format("tls-psk-identity={}: not in {}", settings.psk_identity, settings.psk_file));
    client_psk_ = static_cast<size_t>(it - psk_.begin());
  }
  source_ = fmt::format("psk ({}, {} identities in {})", psk_[client_psk_].identity, psk_.size(), settings.psk_file);
  SSL_CTX_set_psk_server_callback(server_.native_handle(), psk_server_callback);
  SSL_CTX_set_psk_client_callback(client_.native_handle(), psk_client_callback);
  return Status::ok();
}

std::string TlsContext::describe() const { return source_; }

const PskEntry* TlsContext::client_psk() const { return psk_.empty() ? nullptr : &psk_[client_psk_]; }

const PskEntry* TlsContext::find_psk(const std::string& identity) const {
  for (const PskEntry& e : psk_)
    if (e.identity == identity) return &e;
  return nullptr;
}

std::string describe_tls_failure(const boost::system::error_code& ec, long verify_result) {
  if (verify_result != X509_V_OK)
    return fmt::format("the peer's certificate was refused: {}", X509_verify_cert_error_string(verify_result));
  std::string what = ec.message();
  if (what.find("wrong version number") != std::string::npos || what.find("packet length too long") != std::string::npos)
    return "the peer does not speak TLS (it runs with tls=off, or is not a livemig plugin)";
  if (what.find("alert") != std::string::npos)
    return fmt::format("the peer refused the TLS handshake ({}): its credentials do not accept ours", what);
  return fmt::format("TLS handshake failed: {}", what);
}

}  // namespace livemig
