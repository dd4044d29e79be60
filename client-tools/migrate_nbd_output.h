// What migrate-nbd shows people: the status layout, the watch screen and
// line, and the verify verdict. Pure functions from the plugin's JSON replies
// (plugin/control_ops.cpp, MigrationEngine::status_json / verify) to text, so
// they can be tested without a plugin.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/status.h"

namespace livemig::mig {

// One side's status as the tool got it: the reply, or why there is none.
struct SideStatus {
  std::string side;     // "from" or "to"
  std::string address;  // "10.0.0.2:10809" or "socket PATH"
  Result<nlohmann::json> reply = Status::error("not asked");
};

// True for the phases a migration ends in (Done, Failed, Cancelled) and for
// Idle (nothing to watch).
bool is_final_phase(const std::string& phase);

// The "status" subcommand's layout of one side.
std::string render_status(const SideStatus& s);

// Guest-first pacing of one side's migration status (its "pacing"): the
// rate it holds the transfer to, and why.
std::string pacing_text(const nlohmann::json& migration);

// The "stats" subcommand: request counters, the hottest segments, and during
// a migration each segment's score, send set and why.
std::string render_stats(const nlohmann::json& stats);

// The watch screen (several lines, each ending in '\n'), for a terminal
// `width` columns wide. `header` is the first line.
std::string render_watch_screen(const std::string& header, const std::vector<SideStatus>& sides, int width);
// One line per interval for a non-terminal (no ANSI), without '\n'.
std::string render_watch_line(const std::string& clock, const std::vector<SideStatus>& sides);

// The comparison of two verify replies.
struct VerifyResult {
  bool equal = false;
  bool sizes_differ = false;
  uint64_t size_from = 0, size_to = 0;
  uint64_t range_size = 0;
  uint64_t ranges = 0;
  std::string algorithm;
  std::vector<std::pair<uint64_t, uint64_t>> differing;  // (offset, length)
  nlohmann::json to_json() const;
};
// Compares the hash lists range by range. An error if a reply is malformed or
// the two used different algorithms or range sizes.
Result<VerifyResult> compare_verify(const nlohmann::json& from, const nlohmann::json& to);
// "images are equal (N ranges of 64 MiB, xxh3-64)" or the list of differing
// ranges, each line ending in '\n'.
std::string render_verify(const VerifyResult& v);

// `j` on stdout as one line of JSON (invalid UTF-8 replaced), for --json.
void print_json(const nlohmann::json& j);

}  // namespace livemig::mig
