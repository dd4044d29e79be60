// Writes the seed corpus of every fuzz target (tests/fuzz/corpus/<target>/):
// valid inputs that reach deep into the code, which random bytes rarely do.
//
//   build/tests/fuzz/fuzz_make_corpus tests/fuzz/corpus
//
// Deterministic: the same files every run (nonces and keys are fixed bytes),
// so regenerating shows only real changes in `git status`.
#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <vector>

#include "common/byte_order.h"
#include "common/frame_codec.h"
#include "common/state_file.h"
#include "plugin/base_image.h"
#include "plugin/link_compression.h"
#include "tests/fuzz/handshake_script.h"
#include "tests/support/temp_dir.h"

using namespace livemig;
namespace fs = std::filesystem;

namespace {

fs::path g_root;

void write_seed(const std::string& target, const std::string& name, const std::string& bytes) {
  fs::create_directories(g_root / target);
  std::ofstream f(g_root / target / name, std::ios::binary | std::ios::trunc);
  f << bytes;
  if (!f) {
    std::fprintf(stderr, "make_corpus: cannot write %s/%s\n", target.c_str(), name.c_str());
    std::exit(1);
  }
}

template <size_t N>
std::array<uint8_t, N> pattern(uint8_t seed) {
  std::array<uint8_t, N> a;
  for (size_t i = 0; i < N; ++i) a[i] = static_cast<uint8_t>(seed * 31 + i * 7);
  return a;
}

template <Payload T>
std::string frame(const T& p, uint64_t request_id = 1) {
  return encode_message(p, request_id).value();
}

// ---- fuzz_frame: options byte (1 = authenticated limits) + frames.
void frame_seeds() {
  static const std::string block(512, 'b');
  const std::span<const uint8_t> bytes(reinterpret_cast<const uint8_t*>(block.data()), block.size());
  const std::vector<std::pair<std::string, std::string>> frames = {
      {"hello", frame(HelloPayload{kProtocolVersion, pattern<32>(1), "source-host", std::string(kPurposePeer)})},
      {"hello-control", frame(HelloPayload{kProtocolVersion, pattern<32>(2), "cli", std::string(kPurposeControl)})},
      {"auth", frame(AuthPayload{pattern<32>(3)})},
      {"auth-ok", frame(AuthOkPayload{pattern<32>(4)})},
      {"start", frame(StartPayload{"hybrid", R"({"to":"127.0.0.1:10809","threshold":4})", 1 << 30, 4096, 1 << 20,
                                   "mig-7"})},
      {"data", frame(DataPayload{65536, static_cast<uint32_t>(block.size()), 0, bytes}, 9)},
      {"data-zero", frame(DataPayload{1 << 20, 1 << 16, kFlagZero, {}})},
      {"data-compressed", frame(DataPayload{0, 4096, kFlagCompressed, bytes.first(40)})},
      {"data-base", frame(DataPayload{0, 8192, kFlagBase, bytes.first(16)})},
      {"ack", frame(AckPayload{9, 65536, 512})},
      {"handover", frame(HandoverPayload{2, 150, {{0, 50, 3}, {64, 100, 0}}})},
      {"handover-prepare", frame(HandoverPayload{3, 150, {{0, 50, 3}, {64, 100, 0}}, /*prepare=*/true})},
      {"pull", frame(PullPayload{8192, 4096, 1})},
      {"cancel-pull", frame(CancelPullPayload{8192, 4096})},
      {"progress", frame(ProgressPayload{R"({"blocks_left":12,"phase":"PreCopy"})"})},
      {"heartbeat", frame(HeartbeatPayload{5, 1'700'000'000'000'000'000ull})},
      {"error", frame(ErrorPayload{static_cast<uint32_t>(ErrorCode::BadFrame), "HELLO: bad purpose"})},
      {"done", frame(DonePayload{1 << 30, 1 << 18})},
      {"control", frame(ControlPayload{R"({"op":"status"})"})},
      {"control-reply", frame(ControlReplyPayload{R"({"ok":true,"phase":"Idle"})"})},
      {"handover-ack", frame(HandoverAckPayload{2})},
      {"handover-ack-prepare", frame(HandoverAckPayload{3, /*prepare=*/true})},
      {"push-ack", frame(PushAckPayload{77})},
      {"start-ok", frame(StartOkPayload{R"({"phase":"PreCopy","resync":true})"})},
      {"sums", frame(SumsPayload{0, 1 << 20, 64})},
      {"sums-reply", frame(SumsReplyPayload{0, 1 << 20, {0x1122334455667788ull, 42}})},
  };
  std::string stream;
  for (const auto& [name, bytes] : frames) {
    write_seed("fuzz_frame", name, std::string(1, '\1') + bytes);
    stream += bytes;
  }
  // Before authentication only a HELLO fits.
  write_seed("fuzz_frame", "pre-auth-hello", std::string(1, '\0') + frames[0].second);
  // A whole session on one connection.
  write_seed("fuzz_frame", "session-stream", std::string(1, '\1') + stream);
}

// ---- fuzz_handshake: key byte, then steps (handshake_script.h).
std::string step(fuzz::Step s, fuzz::Source src, const std::string& arg = "") {
  return std::string{static_cast<char>(s), static_cast<char>(src)} + arg;
}

void handshake_seeds() {
  using fuzz::Source;
  using fuzz::Step;
  const std::string honest = step(Step::ClientHello, Source::FromPeer) + step(Step::ServerHello, Source::FromPeer) +
                             step(Step::ClientServerHello, Source::FromPeer) +
                             step(Step::ServerAuth, Source::FromPeer) + step(Step::ClientAuthOk, Source::FromPeer);
  write_seed("fuzz_handshake", "honest", std::string(1, '\0') + honest);
  const std::string own_key = "an-operator's-secret-of-40-bytes-length!";
  write_seed("fuzz_handshake", "honest-own-key",
             std::string(1, static_cast<char>(0x80 | own_key.size())) + own_key + honest);
  write_seed("fuzz_handshake", "short-key", std::string(1, static_cast<char>(0x80 | 8)) + "12345678" + honest);
  const std::string hello = step(Step::ClientHello, Source::FromPeer) + step(Step::ServerHello, Source::FromPeer);
  write_seed("fuzz_handshake", "mirror",
             std::string(1, '\0') + hello + step(Step::ClientServerHello, Source::Forged) +
                 step(Step::ClientServerHello, Source::FromPeer));
  const std::string to_auth = hello + step(Step::ClientServerHello, Source::FromPeer);
  for (char variant = 0; variant < 3; ++variant) {
    write_seed("fuzz_handshake", "forged-auth-" + std::to_string(variant),
               std::string(1, '\0') + to_auth + step(Step::ServerAuth, Source::Forged, std::string(1, variant)));
    write_seed("fuzz_handshake", "forged-auth-ok-" + std::to_string(variant),
               std::string(1, '\0') + to_auth + step(Step::ServerAuth, Source::FromPeer) +
                   step(Step::ClientAuthOk, Source::Forged, std::string(1, variant)));
  }
  write_seed("fuzz_handshake", "flipped-auth",
             std::string(1, '\0') + to_auth + step(Step::ServerAuth, Source::FlipBit, "\x11"));
  write_seed("fuzz_handshake", "input-auth",
             std::string(1, '\0') + to_auth + step(Step::ServerAuth, Source::FromInput, std::string(32, 'm')));
  write_seed("fuzz_handshake", "out-of-order",
             std::string(1, '\0') + step(Step::ServerAuth, Source::FromPeer) +
                 step(Step::ClientAuthOk, Source::FromPeer) + honest + honest);
}

// ---- fuzz_control: one request line each.
void control_seeds() {
  const std::vector<std::pair<std::string, std::string>> requests = {
      {"status", R"({"op":"status"})"},
      {"stats", R"({"op":"stats"})"},
      {"stats-top", R"({"op":"stats","top":2})"},
      {"verify", R"({"op":"verify"})"},
      {"verify-range", R"({"op":"verify","offset":4096,"length":16384,"range_size":8192})"},
      {"release", R"({"op":"release"})"},
      {"group-outcome", R"({"op":"group-outcome","group":"grp-1-2"})"},
      {"group-decide-bad", R"({"op":"group-decide","group":"a b","decision":"maybe"})"},
      {"unknown-op", R"({"op":"teleport"})"},
      {"no-op", R"({"top":1})"},
      {"not-object", R"([{"op":"status"}])"},
      {"not-json", R"({"op":"status")"},
      {"deep", std::string(40, '[') + std::string(40, ']')},
      {"migrate",
       R"({"op":"migrate","to":"127.0.0.1:10809","from":"10.0.0.1:10809","mode":"hybrid","threshold":4,)"
       R"("w_read":0.7,"monitor_period":"history","max_resends":3,"handover":"on-disconnect",)"
       R"("resume_timeout":120,"handover_size":1048576,"max_rate":100000000,"max_rounds":10,)"
       R"("transfer_unit":65536})"},
      {"migrate-livefs", R"({"op":"migrate","to":"[::1]:7000","mode":"livefs","threshold":"max"})"},
      {"params-comments", "{\"to\":\"h:1\" /* the destination */, // mode next\n\"mode\":\"postcopy\"}"},
  };
  for (const auto& [name, text] : requests) write_seed("fuzz_control", name, text);
}

// ---- fuzz_state_file: options byte 0 (keep the CRCs) + a state file.
std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}

void state_file_seeds() {
  TempDir dir;
  struct Case {
    std::string name;
    MigrationRecord record;
    int writes;  // write_record calls after create (1: both slots valid)
    IndexRange present;
  };
  MigrationRecord src{"mig-1", "source", "PreCopy", "127.0.0.1:10810", "precopy", 1 << 20, 4096};
  MigrationRecord dst{"mig-2", "destination", "PostCopy", "127.0.0.1:10809", "hybrid", 3 * 4096 + 1, 4096};
  dst.committed_generation = 2;
  dst.extra = {{"params", {{"to", "127.0.0.1:10809"}, {"mode", "hybrid"}}}};
  MigrationRecord empty{"mig-3", "destination", "PreCopy", "h:1", "postcopy", 0, 512};
  const std::vector<Case> cases = {
      {"source-created", src, 0, {0, 0}},
      {"source-two-slots", src, 1, {10, 100}},
      {"destination-three-writes", dst, 2, {0, 4}},
      {"empty-image", empty, 0, {0, 0}},
  };
  for (const Case& c : cases) {
    const std::string path = dir / c.name;
    auto sf = std::move(StateFile::create(path, c.record).value());
    sf->mark_present(c.present);
    if (!sf->sync().is_ok()) std::exit(1);
    MigrationRecord r = c.record;
    for (int i = 0; i < c.writes; ++i) {
      r.handover_generation = i + 1;
      if (!sf->write_record(r).is_ok()) std::exit(1);
    }
    sf.reset();
    write_seed("fuzz_state_file", c.name, std::string(1, '\0') + read_file(path));
  }
}

// ---- fuzz_data: flags byte (1: BASE note), u32 length, u16 block, bytes.
// The fuzz base's block b holds byte b + 1 (fuzz_data.cpp).
void data_seeds() {
  auto header = [](uint8_t flags, uint32_t length, uint16_t block) {
    std::string h(1, char(flags));
    for (int i = 0; i < 4; ++i) h += char(length >> (8 * i));
    for (int i = 0; i < 2; ++i) h += char(block >> (8 * i));
    return h;
  };
  std::string text;
  for (int i = 0; text.size() < 64 * 1024; ++i) text += "block storage migration segment " + std::to_string(i % 97) + " ";
  std::string z;
  if (!compress_frame({reinterpret_cast<const uint8_t*>(text.data()), text.size()}, 3, z)) std::exit(1);
  write_seed("fuzz_data", "compressed", header(0, uint32_t(text.size()), 0) + z);
  write_seed("fuzz_data", "compressed-wrong-length", header(0, uint32_t(text.size()) + 4096, 0) + z);
  std::string sums;
  for (uint8_t b : {2, 3, 4}) {
    const std::string block(4096, char(b + 1));
    uint8_t be[8];
    store_be64(be, block_checksum(block.data(), block.size()));
    sums.append(reinterpret_cast<const char*>(be), 8);
  }
  write_seed("fuzz_data", "base-note", header(1, 3 * 4096, 2) + sums);
  write_seed("fuzz_data", "base-note-mismatch", header(1, 3 * 4096, 5) + sums);
  write_seed("fuzz_data", "junk", header(0, 100, 0) + std::string(64, 'j'));
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: fuzz_make_corpus DIR   (e.g. tests/fuzz/corpus)\n");
    return 2;
  }
  g_root = argv[1];
  frame_seeds();
  handshake_seeds();
  control_seeds();
  state_file_seeds();
  data_seeds();
  std::printf("make_corpus: seeds written under %s\n", g_root.c_str());
  return 0;
}
