// fuzz_handshake: AuthServer and AuthClient (common/peer_auth.h) driven by a
// fuzzed sequence of steps with fuzzed, honest, forged and bit-flipped
// nonces and MACs (the input language is in handshake_script.h).
//
// Each step's result is checked against a model of the two state machines as
// peer_auth.h documents them:
//   - a step out of order is an error and changes nothing;
//   - the server authenticates the client only on an AUTH whose MAC is
//     client_mac(key, its client nonce, its server nonce); any other MAC is
//     EACCES and the session stays failed;
//   - the client accepts the server only on server_mac(key, ...) of its own
//     nonces; a server HELLO echoing the client's nonce is EACCES;
//   - after a failed check every later step fails;
//   - authenticated() / server_authenticated() say exactly that.
#include <cerrno>
#include <cstdint>
#include <optional>

#include "common/peer_auth.h"
#include "tests/fuzz/fuzz_support.h"
#include "tests/fuzz/handshake_script.h"

using namespace livemig;
using namespace livemig::fuzz;

namespace {

enum class ServerState { Start, HelloSent, Authenticated, Failed };
enum class ClientState { Start, HelloSent, AuthSent, Verified, Failed };

const Secret& fixed_key(std::string_view bytes) {
  static const Secret fuzz_key = Secret::from_bytes(kFuzzKey).value();
  static const Secret stranger_key = Secret::from_bytes(kStrangerKey).value();
  return bytes == kFuzzKey ? fuzz_key : stranger_key;
}

Secret key_from(FuzzInput& in) {
  const uint8_t k = in.byte();
  if (k < 0x80) return fixed_key(kFuzzKey);
  std::string_view bytes = in.bytes(k & 0x7f);
  Result<Secret> s = Secret::from_bytes(bytes);
  const bool fits = bytes.size() >= Secret::kMinBytes && bytes.size() <= Secret::kMaxBytes;
  FUZZ_CHECK(s.is_ok() == fits, "Secret::from_bytes of %zu bytes: %s", bytes.size(),
             s.is_ok() ? "accepted" : s.status().message().c_str());
  if (s) FUZZ_CHECK(s->size() == bytes.size(), "a %zu-byte secret keeps %zu bytes", bytes.size(), s->size());
  return s ? *s : fixed_key(kFuzzKey);
}

template <size_t N>
std::array<uint8_t, N> flip(std::array<uint8_t, N> a, uint8_t bit) {
  a[(bit / 8) % N] ^= static_cast<uint8_t>(1u << (bit % 8));
  return a;
}

struct Run {
  Secret key;
  AuthServer server{key};
  AuthClient client{key};
  ServerState ss = ServerState::Start;
  ClientState cs = ClientState::Start;
  // What the model says each side holds.
  Nonce server_cn{}, server_sn{}, client_cn{}, client_sn{};
  // What each side last sent (an honest peer's next argument).
  Nonce sent_client_hello{}, sent_server_hello{};
  Mac sent_client_mac{}, sent_server_mac{};

  explicit Run(Secret k) : key(std::move(k)) {}

  Nonce nonce_arg(FuzzInput& in, const Nonce& honest, const Nonce& forged) {
    switch (static_cast<Source>(in.byte() % kSources)) {
      case Source::FromInput: return in.array<32>();
      case Source::FromPeer: return honest;
      case Source::Forged: return forged;
      case Source::FlipBit: return flip(honest, in.byte());
    }
    return honest;
  }

  // forged(variant): a MAC an attacker can make without the key.
  template <typename Forge>
  Mac mac_arg(FuzzInput& in, const Mac& honest, Forge forged) {
    switch (static_cast<Source>(in.byte() % kSources)) {
      case Source::FromInput: return in.array<32>();
      case Source::FromPeer: return honest;
      case Source::Forged: return forged(in.byte() % 3);
      case Source::FlipBit: return flip(honest, in.byte());
    }
    return honest;
  }

  void server_hello(FuzzInput& in) {
    // Forged: the server's own nonce reflected back at it.
    Nonce cn = nonce_arg(in, sent_client_hello, sent_server_hello);
    Result<Nonce> r = server.on_hello(cn);
    if (ss != ServerState::Start) {
      FUZZ_CHECK(!r.is_ok(), "server took a second HELLO");
      return;
    }
    FUZZ_CHECK(r.is_ok(), "server refused its first HELLO: %s", r.status().message().c_str());
    ss = ServerState::HelloSent;
    server_cn = cn;
    server_sn = *r;
    sent_server_hello = *r;
  }

  void server_auth(FuzzInput& in) {
    Mac mac = mac_arg(in, sent_client_mac, [&](int variant) {
      switch (variant) {
        case 0: return client_mac(fixed_key(kStrangerKey), server_cn, server_sn);  // wrong key
        case 1: return server_mac(key, server_cn, server_sn);                      // reflection
        default: return client_mac(key, server_sn, server_cn);                     // nonces swapped
      }
    });
    Result<Mac> r = server.on_auth(mac);
    if (ss != ServerState::HelloSent) {
      FUZZ_CHECK(!r.is_ok(), "server took an AUTH out of order");
      return;
    }
    if (mac == client_mac(key, server_cn, server_sn)) {
      FUZZ_CHECK(r.is_ok(), "server refused the right MAC: %s", r.status().message().c_str());
      FUZZ_CHECK(*r == server_mac(key, server_cn, server_sn), "server's AUTH_OK MAC is not server_mac()");
      ss = ServerState::Authenticated;
      sent_server_mac = *r;
    } else {
      FUZZ_CHECK(!r.is_ok(), "server accepted a MAC that is not client_mac(key, its nonces)");
      FUZZ_CHECK(r.status().errno_value() == EACCES, "wrong MAC: errno %d, not EACCES", r.status().errno_value());
      ss = ServerState::Failed;
    }
  }

  void client_hello() {
    Result<Nonce> r = client.hello();
    if (cs != ClientState::Start) {
      FUZZ_CHECK(!r.is_ok(), "client sent a second HELLO");
      return;
    }
    FUZZ_CHECK(r.is_ok(), "client refused to start: %s", r.status().message().c_str());
    cs = ClientState::HelloSent;
    client_cn = *r;
    sent_client_hello = *r;
  }

  void client_server_hello(FuzzInput& in) {
    // Forged: a mirror echoing the client's own nonce.
    Nonce sn = nonce_arg(in, sent_server_hello, client_cn);
    Result<Mac> r = client.on_server_hello(sn);
    if (cs != ClientState::HelloSent) {
      FUZZ_CHECK(!r.is_ok(), "client took a server HELLO out of order");
      return;
    }
    if (sn == client_cn) {
      FUZZ_CHECK(!r.is_ok(), "client answered a server HELLO that echoed its own nonce");
      FUZZ_CHECK(r.status().errno_value() == EACCES, "mirror: errno %d, not EACCES", r.status().errno_value());
      cs = ClientState::Failed;
      return;
    }
    FUZZ_CHECK(r.is_ok(), "client refused a server HELLO: %s", r.status().message().c_str());
    FUZZ_CHECK(*r == client_mac(key, client_cn, sn), "client's AUTH MAC is not client_mac()");
    cs = ClientState::AuthSent;
    client_sn = sn;
    sent_client_mac = *r;
  }

  void client_auth_ok(FuzzInput& in) {
    Mac mac = mac_arg(in, sent_server_mac, [&](int variant) {
      switch (variant) {
        case 0: return server_mac(fixed_key(kStrangerKey), client_cn, client_sn);
        case 1: return client_mac(key, client_cn, client_sn);  // its own MAC reflected
        default: return server_mac(key, client_sn, client_cn);
      }
    });
    Status r = client.on_auth_ok(mac);
    if (cs != ClientState::AuthSent) {
      FUZZ_CHECK(!r.is_ok(), "client took an AUTH_OK out of order");
      return;
    }
    if (mac == server_mac(key, client_cn, client_sn)) {
      FUZZ_CHECK(r.is_ok(), "client refused the right server MAC: %s", r.message().c_str());
      cs = ClientState::Verified;
    } else {
      FUZZ_CHECK(!r.is_ok(), "client accepted a server MAC that is not server_mac(key, its nonces)");
      FUZZ_CHECK(r.errno_value() == EACCES, "wrong server MAC: errno %d, not EACCES", r.errno_value());
      cs = ClientState::Failed;
    }
  }

  void check_flags() const {
    FUZZ_CHECK(server.authenticated() == (ss == ServerState::Authenticated), "server.authenticated() is %d",
               server.authenticated());
    FUZZ_CHECK(client.server_authenticated() == (cs == ClientState::Verified),
               "client.server_authenticated() is %d", client.server_authenticated());
  }
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  FuzzInput in(data, size);
  Run run(key_from(in));
  // A handshake is 5 steps; 64 leave room for every out-of-order mix.
  for (int i = 0; i < 64 && !in.empty(); ++i) {
    switch (static_cast<Step>(in.byte() % kSteps)) {
      case Step::ServerHello: run.server_hello(in); break;
      case Step::ServerAuth: run.server_auth(in); break;
      case Step::ClientHello: run.client_hello(); break;
      case Step::ClientServerHello: run.client_server_hello(in); break;
      case Step::ClientAuthOk: run.client_auth_ok(in); break;
    }
    run.check_flags();
  }
  return 0;
}
