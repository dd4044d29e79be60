// The input language of fuzz_handshake, shared with the seed generator
// (make_corpus.cpp): which key, then steps of the two state machines of
// common/peer_auth.h, each with where its argument comes from.
//
//   key byte   < 0x80: the fixed key kFuzzKey
//              >= 0x80: the next (key & 0x7f) bytes, through Secret::from_bytes
//                       (kFuzzKey if that refuses them)
//   step       two bytes: Step (mod 5), Source (mod 4), then, by source,
//              32 argument bytes (FromInput) or a bit index (FlipBit)
#pragma once

#include <cstdint>
#include <string_view>

namespace livemig::fuzz {

inline constexpr std::string_view kFuzzKey = "fuzz-handshake-key-0123456789abcdef";
// The key a stranger has: MACs made with it must not verify.
inline constexpr std::string_view kStrangerKey = "a-stranger's-key-that-is-not-the-peer's";

enum class Step : uint8_t {
  ServerHello = 0,     // server.on_hello(nonce)
  ServerAuth = 1,      // server.on_auth(mac)
  ClientHello = 2,     // client.hello()
  ClientServerHello = 3,  // client.on_server_hello(nonce)
  ClientAuthOk = 4,    // client.on_auth_ok(mac)
};
inline constexpr int kSteps = 5;

// Where a step's nonce or MAC comes from.
enum class Source : uint8_t {
  FromInput = 0,  // the next 32 input bytes
  FromPeer = 1,   // what the other side last produced for this step (an honest peer)
  Forged = 2,     // nonce: the client's own nonce (a mirror); MAC: the right
                  // computation under kStrangerKey
  FlipBit = 3,    // FromPeer with one bit flipped (the next byte picks it)
};
inline constexpr int kSources = 4;

}  // namespace livemig::fuzz
