// Unit tests of migrate-nbd's pure parts: the verify comparison, and what
// the status and watch output show (SIZE and RATE parsing is the client
// library's: client/units_test.cpp). The behaviour against real plugins is
// in migrate_nbd_selftest.sh.
#include "client-tools/migrate_nbd_output.h"

#include <string>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

using namespace livemig::mig;
using nlohmann::json;

namespace {
json verify_reply(uint64_t size, uint64_t range, std::vector<std::string> hashes) {
  return {{"ok", true},        {"size", size},           {"offset", 0},
          {"length", size},    {"range_size", range},    {"algorithm", "xxh3-64"},
          {"hashes", hashes}};
}
}  // namespace

TEST_CASE("verify of equal hash lists says equal with the range count") {
  auto r = compare_verify(verify_reply(3 << 20, 1 << 20, {"a", "b", "c"}), verify_reply(3 << 20, 1 << 20, {"a", "b", "c"}));
  REQUIRE(r);
  CHECK(r->equal);
  CHECK(render_verify(*r) == "images are equal (3 ranges of 1 MiB, xxh3-64)\n");
}

TEST_CASE("verify names every differing range, the last one short") {
  uint64_t size = (2 << 20) + 4096;
  auto r = compare_verify(verify_reply(size, 1 << 20, {"a", "b", "c"}), verify_reply(size, 1 << 20, {"x", "b", "y"}));
  REQUIRE(r);
  CHECK_FALSE(r->equal);
  REQUIRE(r->differing.size() == 2);
  CHECK(r->differing[0] == std::pair<uint64_t, uint64_t>{0, 1 << 20});
  CHECK(r->differing[1] == std::pair<uint64_t, uint64_t>{2 << 20, 4096});
  std::string text = render_verify(*r);
  CHECK(text.find("images differ in 2 of 3 ranges") != std::string::npos);
  CHECK(text.find("offset 2097152 (2 MiB), length 4096 (4 KiB)") != std::string::npos);
}

TEST_CASE("verify of images of different sizes says so") {
  auto r = compare_verify(verify_reply(1 << 20, 1 << 20, {"a"}), verify_reply(2 << 20, 1 << 20, {"a", "b"}));
  REQUIRE(r);
  CHECK(r->sizes_differ);
  CHECK_FALSE(r->equal);
  CHECK(render_verify(*r).find("differ in size") != std::string::npos);
}

TEST_CASE("a malformed verify reply is an error, not a crash") {
  CHECK_FALSE(compare_verify(json{{"ok", true}}, verify_reply(1, 1, {"a"})));
  CHECK_FALSE(compare_verify(json::array(), verify_reply(1, 1, {"a"})));
}

TEST_CASE("status shows phase, progress and the migration's measures") {
  json st = {{"ok", true},       {"image", "/tmp/a.img"}, {"size", 64 << 20},  {"block_size", 4096},
             {"blocks", 16384},  {"role", "source"},      {"phase", "Sync"},   {"io_mode", "source-tracking"},
             {"authoritative", true},
             {"migration",
              {{"id", "abc"},          {"mode", "precopy"},        {"peer", "127.0.0.1:2"},
               {"blocks_total", 16384}, {"blocks_left", 4096},       {"bytes_left", 16 << 20},
               {"rounds", 2},           {"ready", true},             {"converged", true},
               {"ready_reason", "converged: 1 blocks left"},        {"payload_bytes_sent", 48 << 20},
               {"wire_bytes", 49 << 20}, {"link_bytes_per_second", 1 << 20}, {"dirty_blocks_per_second", 10.0},
               {"eta_seconds", 16.0},   {"handover_pause_ms", -1},   {"total_time_ms", -1}}}};
  SideStatus s{"from", "127.0.0.1:1", st};
  std::string text = render_status(s);
  CHECK(text.find("phase           Sync") != std::string::npos);
  CHECK(text.find("4096 of 16384 (75.0% done)") != std::string::npos);
  CHECK(text.find("yes, converged (converged: 1 blocks left)") != std::string::npos);
  CHECK(text.find("40 KiB/s (10 blocks/s)") != std::string::npos);
  std::string screen = render_watch_screen("title", {s}, 80);
  CHECK(screen.find("75.0%") != std::string::npos);
  CHECK(screen.find("[#") != std::string::npos);
  std::string line = render_watch_line("12:00:00", {s});
  CHECK(line.find("Sync 75.0% 12288/16384 blocks") != std::string::npos);
}

TEST_CASE("status says how guest-first pacing holds the migration back, and when it cannot") {
  json pacing = {{"active", true},           {"guest_latency_bound", 1.2}, {"baseline_p99_ms", 0.4},
                 {"window_p99_ms", 0.9},     {"rate", 32 << 20},          {"windows", 40},
                 {"windows_over_bound", 7}};
  json st = {{"role", "source"}, {"phase", "PreCopy"}, {"block_size", 4096},
             {"migration", {{"mode", "auto"}, {"blocks_total", 100}, {"blocks_left", 50}, {"pacing", pacing}}}};
  std::string text = render_status(SideStatus{"from", "127.0.0.1:1", st});
  CHECK(text.find("held to 32 MiB/s: guest p99 0.90 ms, bound 1.2x its 0.40 ms before (7 of 40 windows over)") !=
        std::string::npos);
  st["migration"]["pacing"] = {{"active", false}, {"guest_latency_bound", 1.2}};
  CHECK(render_status(SideStatus{"from", "127.0.0.1:1", st}).find("off (too few guest requests to measure)") !=
        std::string::npos);
  CHECK(render_status(SideStatus{"from", "127.0.0.1:1", st}).find("nice") == std::string::npos);
  st["migration"]["params"] = {{"migration_nice", 10}};
  CHECK(render_status(SideStatus{"from", "127.0.0.1:1", st}).find("off (too few guest requests to measure); data "
                                                                   "movers at nice 10") != std::string::npos);
}

TEST_CASE("status says what compression saved and why auto compresses or not") {
  json c = {{"setting", "auto"},          {"active", true},           {"level", -1},
            {"reason", "the link is the bottleneck"}, {"frames", 40},  {"plain_bytes", 10 << 20},
            {"wire_bytes", 4 << 20}};
  json st = {{"role", "source"}, {"phase", "PreCopy"}, {"block_size", 4096},
             {"migration", {{"mode", "auto"}, {"blocks_total", 100}, {"blocks_left", 50}, {"compression", c}}}};
  std::string text = render_status(SideStatus{"from", "127.0.0.1:1", st});
  CHECK(text.find("compression     10 MiB of data crossed as 4 MiB (2.5x, 40 frames); auto: compressing at "
                  "level -1 (the link is the bottleneck)") != std::string::npos);
  st["migration"]["base"] = {{"blocks", 256}, {"bytes", 1 << 20}, {"refused_notes", 0}};
  CHECK(render_status(SideStatus{"from", "127.0.0.1:1", st})
            .find("base image      256 blocks (1 MiB) as notes, read from the base at the destination\n") !=
        std::string::npos);
  st["migration"].erase("base");
  // The destination knows only what it decompressed.
  st["role"] = "destination";
  st["migration"]["compression"] = {{"frames", 2}, {"plain_bytes", 1 << 20}, {"wire_bytes", 1 << 19}};
  CHECK(render_status(SideStatus{"to", "127.0.0.1:2", st}).find("1 MiB of data crossed as 512 KiB (2.0x, 2 frames)\n") !=
        std::string::npos);
}

TEST_CASE("a side that does not answer is shown with its error") {
  SideStatus s{"to", "127.0.0.1:2", livemig::Status::error("cannot reach 127.0.0.1:2: Connection refused")};
  CHECK(render_watch_line("t", {s}).find("unreachable: cannot reach") != std::string::npos);
}

TEST_CASE("a destination before handover shows what it received, not a progress bar") {
  json st = {{"role", "destination"}, {"phase", "PreCopy"}, {"block_size", 4096},
             {"migration", {{"mode", "precopy"}, {"blocks_total", 100}, {"blocks_left", 0}, {"blocks_received", 40}}}};
  SideStatus s{"to", "127.0.0.1:2", st};
  std::string screen = render_watch_screen("t", {s}, 80);
  CHECK(screen.find("receiving: 40 blocks (160 KiB)") != std::string::npos);
  CHECK(screen.find("100.0%") == std::string::npos);
  CHECK(render_status(s).find("known at handover") != std::string::npos);
}

TEST_CASE("a source after handover shows the destination's progress; Done means nothing is left") {
  json m = {{"mode", "postcopy"}, {"blocks_total", 100}, {"blocks_left", 100}, {"eta_seconds", 99999.0},
            {"peer", {{"blocks_left", 25}, {"bytes_left", 25 * 4096}, {"eta_seconds", 3.0}}},
            {"params", {{"to", "127.0.0.1:2"}}}};
  json st = {{"role", "source"}, {"phase", "PostCopy"}, {"block_size", 4096}, {"migration", m}};
  SideStatus s{"from", "127.0.0.1:1", st};
  std::string text = render_status(s);
  CHECK(text.find("25 of 100 (75.0% done) (as the destination reports)") != std::string::npos);
  CHECK(text.find("precopy to 127.0.0.1:2") == std::string::npos);
  CHECK(text.find("postcopy to 127.0.0.1:2") != std::string::npos);
  st["phase"] = "Done";
  SideStatus done{"from", "127.0.0.1:1", st};
  CHECK(render_watch_line("t", {done}).find("Done 100.0% 100/100 blocks") != std::string::npos);
  CHECK(render_watch_line("t", {done}).find("ETA -") != std::string::npos);
}
