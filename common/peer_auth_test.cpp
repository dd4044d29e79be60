#include "common/peer_auth.h"

#include <sys/stat.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include <openssl/evp.h>
#include <openssl/hmac.h>

#include <catch2/catch.hpp>

#include "tests/support/strings.h"
#include "tests/support/temp_dir.h"

using livemig::AuthClient;
using livemig::AuthServer;
using livemig::Mac;
using livemig::Nonce;
using livemig::Secret;
using livemig::Status;

using livemig::contains;
using livemig::TempDir;

namespace {

Secret secret_of(const std::string& bytes) {
  auto s = Secret::from_bytes(bytes);
  REQUIRE(s.is_ok());
  return std::move(*s);
}

std::string hex(const Mac& m) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  for (uint8_t b : m) {
    out += digits[b >> 4];
    out += digits[b & 15];
  }
  return out;
}

// Writes `content` to `name` in `dir` with file mode `mode`; its path.
std::string write_file(const TempDir& dir, const std::string& name, const std::string& content, mode_t mode = 0600) {
  std::string p = dir / name;
  {
    std::ofstream f(p, std::ios::binary | std::ios::trunc);
    f << content;
  }
  REQUIRE(::chmod(p.c_str(), mode) == 0);
  return p;
}

// Runs a whole handshake; returns {client side status, server side status}.
std::pair<Status, Status> handshake(const Secret& client_key, const Secret& server_key) {
  AuthClient client(client_key);
  AuthServer server(server_key);
  auto nc = client.hello();
  REQUIRE(nc.is_ok());
  auto ns = server.on_hello(*nc);
  REQUIRE(ns.is_ok());
  auto mac_c = client.on_server_hello(*ns);
  REQUIRE(mac_c.is_ok());
  auto mac_s = server.on_auth(*mac_c);
  if (!mac_s) {
    // A real server hangs up here: the client gets no MAC to check (or to
    // test guesses against). Show the client a forged one.
    return {client.on_auth_ok(Mac{}), mac_s.status()};
  }
  return {client.on_auth_ok(*mac_s), Status::ok()};
}

}  // namespace

TEST_CASE("hmac_sha256 matches RFC 4231 test cases 1 and 2", "[auth]") {
  std::array<uint8_t, 20> key1;
  key1.fill(0x0b);
  std::string data1 = "Hi There";
  Mac m1 = livemig::hmac_sha256(key1.data(), key1.size(), reinterpret_cast<const uint8_t*>(data1.data()),
                                data1.size());
  CHECK(hex(m1) == "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7");

  std::string key2 = "Jefe";
  std::string data2 = "what do ya want for nothing?";
  Mac m2 = livemig::hmac_sha256(reinterpret_cast<const uint8_t*>(key2.data()), key2.size(),
                                reinterpret_cast<const uint8_t*>(data2.data()), data2.size());
  CHECK(hex(m2) == "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
}

TEST_CASE("server and client MACs match an independent HMAC of label and nonces", "[auth]") {
  const std::string key = "0123456789abcdef0123456789abcdef";
  Secret secret = secret_of(key);
  Nonce nc, ns;
  for (int i = 0; i < 32; ++i) {
    nc[i] = static_cast<uint8_t>(i);
    ns[i] = static_cast<uint8_t>(32 + i);
  }
  // Expected values computed with Python's hmac module.
  CHECK(hex(livemig::server_mac(secret, nc, ns)) ==
        "52ac003febe10f38e32ff8e1a63af5f4dea5d1b9d4c8e904303c938fb1fe3267");
  CHECK(hex(livemig::client_mac(secret, nc, ns)) ==
        "8447983a5ae5fc97dc415a7743d39defa28479083777fbcb7f3ba8db68cc52f6");

  // And with OpenSSL's one-shot HMAC over the documented message.
  std::string msg = "livemig-v2 server";
  msg.append(reinterpret_cast<const char*>(nc.data()), nc.size());
  msg.append(reinterpret_cast<const char*>(ns.data()), ns.size());
  Mac expected{};
  unsigned int len = 0;
  REQUIRE(HMAC(EVP_sha256(), key.data(), static_cast<int>(key.size()),
               reinterpret_cast<const unsigned char*>(msg.data()), msg.size(), expected.data(), &len) != nullptr);
  REQUIRE(len == 32);
  CHECK(livemig::server_mac(secret, nc, ns) == expected);
}

TEST_CASE("two peers with the same secret authenticate each other", "[auth]") {
  Secret key = secret_of("correct horse battery staple");
  AuthClient client(key);
  AuthServer server(key);
  auto nc = client.hello();
  REQUIRE(nc.is_ok());
  auto ns = server.on_hello(*nc);
  REQUIRE(ns.is_ok());
  auto mac_c = client.on_server_hello(*ns);
  REQUIRE(mac_c.is_ok());
  CHECK_FALSE(server.authenticated());
  auto mac_s = server.on_auth(*mac_c);
  REQUIRE(mac_s.is_ok());
  CHECK(server.authenticated());
  CHECK_FALSE(client.server_authenticated());
  REQUIRE(client.on_auth_ok(*mac_s).is_ok());
  CHECK(client.server_authenticated());
}

TEST_CASE("a client with a different secret is refused and learns no server MAC", "[auth]") {
  Secret a = secret_of("secret-number-one-aaaa");
  Secret b = secret_of("secret-number-two-bbbb");
  auto [client_status, server_status] = handshake(a, b);
  CHECK_FALSE(server_status.is_ok());
  CHECK(server_status.message() == "authentication failed: wrong secret");
  CHECK(server_status.errno_value() == EACCES);
  CHECK_FALSE(client_status.is_ok());
}

// Issue #13: the server sent its MAC before the client proved anything, an
// offline oracle for weak passphrases. Now the server's HELLO is its nonce
// alone: nothing in it depends on the key.
TEST_CASE("the server's HELLO carries nothing that depends on the key", "[auth]") {
  Nonce nc = livemig::random_nonce();
  AuthServer server1(secret_of("a-weak-passphrase-1"));
  AuthServer server2(secret_of("another-passphrase-2"));
  auto n1 = server1.on_hello(nc);
  auto n2 = server2.on_hello(nc);
  REQUIRE(n1.is_ok());
  REQUIRE(n2.is_ok());
  CHECK(*n1 != nc);
  CHECK(*n1 != *n2);  // fresh random nonces, whatever the key
  CHECK_FALSE(server1.authenticated());
}

TEST_CASE("a client detects a server with the wrong secret", "[auth]") {
  Secret good = secret_of("the-shared-secret-1234");
  Secret bad = secret_of("an-impostor-secret-5678");
  AuthClient client(good);
  auto nc = client.hello();
  Nonce ns = livemig::random_nonce();
  REQUIRE(client.on_server_hello(ns).is_ok());
  Status st = client.on_auth_ok(livemig::server_mac(bad, *nc, ns));
  CHECK_FALSE(st.is_ok());
  CHECK(st.message() == "server failed authentication (wrong secret or not a livemig peer)");
  CHECK(st.errno_value() == EACCES);
  CHECK_FALSE(client.server_authenticated());
}

TEST_CASE("a replayed client AUTH from an earlier session fails against a new server nonce", "[auth]") {
  Secret key = secret_of("the-shared-secret-1234");
  // An eavesdropper records a whole good session.
  AuthClient client(key);
  AuthServer server1(key);
  auto nc = client.hello();
  REQUIRE(nc.is_ok());
  auto ns = server1.on_hello(*nc);
  REQUIRE(ns.is_ok());
  auto recorded = client.on_server_hello(*ns);
  REQUIRE(recorded.is_ok());
  REQUIRE(server1.on_auth(*recorded).is_ok());

  // It replays the client's HELLO and AUTH to a new session.
  AuthServer server2(key);
  auto ns2 = server2.on_hello(*nc);
  REQUIRE(ns2.is_ok());
  CHECK(*ns2 != *ns);
  CHECK_FALSE(server2.on_auth(*recorded).is_ok());
  CHECK_FALSE(server2.authenticated());
}

TEST_CASE("a replayed AUTH_OK fails against a new client nonce", "[auth]") {
  Secret key = secret_of("the-shared-secret-1234");
  // A recorded session's server nonce and AUTH_OK MAC.
  Nonce old_nc = livemig::random_nonce(), ns = livemig::random_nonce();
  Mac recorded = livemig::server_mac(key, old_nc, ns);
  AuthClient client(key);
  REQUIRE(client.hello().is_ok());
  REQUIRE(client.on_server_hello(ns).is_ok());
  CHECK_FALSE(client.on_auth_ok(recorded).is_ok());
  CHECK_FALSE(client.server_authenticated());
}

TEST_CASE("a client's own MAC reflected back as AUTH_OK fails", "[auth]") {
  Secret key = secret_of("the-shared-secret-1234");
  AuthClient client(key);
  REQUIRE(client.hello().is_ok());
  auto mac_c = client.on_server_hello(livemig::random_nonce());
  REQUIRE(mac_c.is_ok());
  CHECK_FALSE(client.on_auth_ok(*mac_c).is_ok());
}

TEST_CASE("a server that echoes the client's nonce is refused before the client sends its MAC", "[auth]") {
  Secret key = secret_of("the-shared-secret-1234");
  AuthClient client(key);
  auto nc = client.hello();
  REQUIRE(nc.is_ok());
  auto mac = client.on_server_hello(*nc);
  CHECK_FALSE(mac.is_ok());
  CHECK(mac.status().errno_value() == EACCES);
  CHECK_FALSE(client.on_auth_ok(livemig::server_mac(key, *nc, *nc)).is_ok());
}

TEST_CASE("handshake steps out of order fail without changing the state", "[auth]") {
  Secret key = secret_of("the-shared-secret-1234");

  SECTION("server: AUTH before HELLO") {
    AuthServer server(key);
    CHECK_FALSE(server.on_auth(Mac{}).is_ok());
    CHECK_FALSE(server.authenticated());
    // The session still works afterwards.
    AuthClient client(key);
    auto ns = server.on_hello(*client.hello());
    REQUIRE(ns.is_ok());
    CHECK(server.on_auth(*client.on_server_hello(*ns)).is_ok());
  }
  SECTION("server: HELLO twice") {
    AuthServer server(key);
    REQUIRE(server.on_hello(livemig::random_nonce()).is_ok());
    CHECK_FALSE(server.on_hello(livemig::random_nonce()).is_ok());
  }
  SECTION("server: AUTH accepted at most once") {
    AuthClient client(key);
    AuthServer server(key);
    auto ns = server.on_hello(*client.hello());
    Mac mac = *client.on_server_hello(*ns);
    REQUIRE(server.on_auth(mac).is_ok());
    CHECK_FALSE(server.on_auth(mac).is_ok());
  }
  SECTION("server: no second chance after a wrong AUTH") {
    AuthClient client(key);
    AuthServer server(key);
    auto ns = server.on_hello(*client.hello());
    Mac good = *client.on_server_hello(*ns);
    Mac bad = good;
    bad[0] ^= 1;
    CHECK_FALSE(server.on_auth(bad).is_ok());
    CHECK_FALSE(server.on_auth(good).is_ok());
    CHECK_FALSE(server.authenticated());
  }
  SECTION("client: server HELLO before client HELLO") {
    AuthClient client(key);
    CHECK_FALSE(client.on_server_hello(livemig::random_nonce()).is_ok());
    CHECK(client.hello().is_ok());
  }
  SECTION("client: AUTH_OK before AUTH") {
    AuthClient client(key);
    CHECK_FALSE(client.on_auth_ok(Mac{}).is_ok());
    REQUIRE(client.hello().is_ok());
    CHECK_FALSE(client.on_auth_ok(Mac{}).is_ok());
  }
  SECTION("client: HELLO twice, server HELLO twice, AUTH_OK twice") {
    AuthClient client(key);
    AuthServer server(key);
    auto nc = client.hello();
    REQUIRE(nc.is_ok());
    CHECK_FALSE(client.hello().is_ok());
    auto ns = server.on_hello(*nc);
    auto mac_c = client.on_server_hello(*ns);
    REQUIRE(mac_c.is_ok());
    CHECK_FALSE(client.on_server_hello(*ns).is_ok());
    auto mac_s = server.on_auth(*mac_c);
    REQUIRE(client.on_auth_ok(*mac_s).is_ok());
    CHECK_FALSE(client.on_auth_ok(*mac_s).is_ok());
  }
  SECTION("client: no success after a failed AUTH_OK") {
    AuthClient client(key);
    auto nc = client.hello();
    Nonce ns = livemig::random_nonce();
    REQUIRE(client.on_server_hello(ns).is_ok());
    CHECK_FALSE(client.on_auth_ok(Mac{}).is_ok());
    CHECK_FALSE(client.on_auth_ok(livemig::server_mac(key, *nc, ns)).is_ok());
    CHECK_FALSE(client.server_authenticated());
  }
}

TEST_CASE("random nonces differ", "[auth]") {
  CHECK(livemig::random_nonce() != livemig::random_nonce());
}

TEST_CASE("load_secret reads the key and trims one trailing newline", "[auth]") {
  TempDir dir;
  std::string warning = "stale";
  auto s = livemig::load_secret(write_file(dir, "psk", "0123456789abcdef\n"), &warning);
  REQUIRE(s.is_ok());
  CHECK(s->size() == 16);
  CHECK(std::string(reinterpret_cast<const char*>(s->data()), s->size()) == "0123456789abcdef");
  CHECK(warning.empty());

  auto crlf = livemig::load_secret(write_file(dir, "crlf", "0123456789abcdef\r\n"));
  REQUIRE(crlf.is_ok());
  CHECK(crlf->size() == 16);

  // Keys from files and from bytes authenticate each other.
  auto [c, srv] = handshake(*s, secret_of("0123456789abcdef"));
  CHECK(c.is_ok());
  CHECK(srv.is_ok());
}

TEST_CASE("load_secret errors name the path and what is wrong", "[auth]") {
  TempDir dir;
  SECTION("missing file") {
    std::string p = dir / "nope";
    auto s = livemig::load_secret(p);
    REQUIRE_FALSE(s.is_ok());
    CHECK(contains(s.status().message(), p));
    CHECK(s.status().errno_value() == ENOENT);
  }
  SECTION("empty file") {
    std::string p = write_file(dir, "empty", "");
    auto s = livemig::load_secret(p);
    REQUIRE_FALSE(s.is_ok());
    CHECK(contains(s.status().message(), p));
    CHECK(contains(s.status().message(), "empty"));
  }
  SECTION("only a newline") {
    std::string p = write_file(dir, "nl", "\n");
    auto s = livemig::load_secret(p);
    REQUIRE_FALSE(s.is_ok());
    CHECK(contains(s.status().message(), "empty"));
  }
  SECTION("short key: 15 bytes after the newline is trimmed") {
    std::string p = write_file(dir, "short", "0123456789abcde\n");
    auto s = livemig::load_secret(p);
    REQUIRE_FALSE(s.is_ok());
    CHECK(contains(s.status().message(), p));
    CHECK(contains(s.status().message(), "15 bytes"));
    CHECK(contains(s.status().message(), "at least 16"));
  }
  SECTION("a directory") {
    auto s = livemig::load_secret(dir.path());
    REQUIRE_FALSE(s.is_ok());
    CHECK(contains(s.status().message(), dir.path()));
  }
  SECTION("unreadable file") {
    if (::geteuid() == 0) {
      SUCCEED("root reads files whatever their mode");
    } else {
      std::string p = write_file(dir, "locked", "0123456789abcdef", 0000);
      auto s = livemig::load_secret(p);
      REQUIRE_FALSE(s.is_ok());
      CHECK(contains(s.status().message(), p));
    }
  }
  SECTION("too long") {
    std::string p = write_file(dir, "huge", std::string(Secret::kMaxBytes + 10, 'x'));
    auto s = livemig::load_secret(p);
    REQUIRE_FALSE(s.is_ok());
    CHECK(contains(s.status().message(), p));
  }
}

TEST_CASE("load_secret warns when the key file is readable by group or others", "[auth]") {
  TempDir dir;
  std::string warning;
  std::string p = write_file(dir, "psk", "0123456789abcdef0123", 0644);
  auto s = livemig::load_secret(p, &warning);
  REQUIRE(s.is_ok());
  CHECK(contains(warning, p));
  CHECK(contains(warning, "0644"));

  std::string p2 = write_file(dir, "psk2", "0123456789abcdef0123", 0640);
  REQUIRE(livemig::load_secret(p2, &warning).is_ok());
  CHECK(contains(warning, p2));

  std::string p3 = write_file(dir, "psk3", "0123456789abcdef0123", 0400);
  REQUIRE(livemig::load_secret(p3, &warning).is_ok());
  CHECK(warning.empty());
}

TEST_CASE("a copied or moved secret keeps its bytes and the original stays usable", "[auth]") {
  Secret a = secret_of("0123456789abcdef0123");
  Secret b = a;
  CHECK(b.size() == a.size());
  Secret c = std::move(b);
  CHECK(b.empty());
  CHECK(c.size() == 20);
  Nonce nc = livemig::random_nonce(), ns = livemig::random_nonce();
  CHECK(livemig::server_mac(a, nc, ns) == livemig::server_mac(c, nc, ns));
  b = c;
  CHECK(livemig::client_mac(b, nc, ns) == livemig::client_mac(a, nc, ns));
}
