// fuzz_control: a control request as a client sends it (one line of text),
// through what parses it:
//   - json_depth_within / parse_json_object (common/json_limits.h): a text
//     they accept nests at most kMaxJsonDepth deep, and on valid JSON the
//     depth scan agrees with the parsed value's depth;
//   - MigrationParams::from_json (common/migration_params.h) on the object:
//     errors are values (no exception), and what it accepts survives
//     to_json() -> from_json() unchanged;
//   - the plugin's handle_control_request (plugin/control_ops.h) on a
//     PluginState over a 64 KiB temporary image with an idle engine whose
//     threads never start: every reply is one line, a JSON object with "ok",
//     and "error" when not ok. (An exception a handler throws is caught by
//     handle_control_request and answered "internal error: ...": allowed.)
// Ops that dial a peer or change a migration (kNetworkOps) never reach the
// plugin; an op the plugin knows but this target does not is an invariant
// failure, so a new op gets classified here before it is fuzzed.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "common/control_server.h"
#include "common/json_limits.h"
#include "common/migration_params.h"
#include "common/peer_auth.h"
#include "plugin/control_ops.h"
#include "plugin/migration_engine.h"
#include "plugin/peer_server.h"
#include "plugin/plugin_state.h"
#include "tests/fuzz/fuzz_support.h"
#include "tests/support/temp_dir.h"

using nlohmann::json;
using namespace livemig;

// livemig_plugin.cpp defines these in the plugin, which this target does not link.
livemig::PluginState::PluginState() = default;
livemig::PluginState::~PluginState() = default;

namespace {

// Ops that would connect to a peer or start, end or change a migration.
// (group-resolve asks a group's coordinator.)
constexpr std::string_view kNetworkOps[] = {"migrate", "handover", "cancel", "resolve", "group-resolve"};
// Ops that only read state or hash the local image. (group-decide and
// group-outcome: this Plugin keeps no group decisions, so they check their
// request and answer an error, writing nothing.)
constexpr std::string_view kLocalOps[] = {"status", "stats", "release", "verify", "group-decide", "group-outcome"};

// Open findings (tests/fuzz/open/fuzz_control/) step aside when
// $LIVEMIG_FUZZ_SKIP_KNOWN is set (tests/fuzz/run --skip-known), so that a
// long run looks for new bugs instead of finding these again. Replays and
// regression tests never set it. Delete each skip with the fix.
bool skip_known() {
  static const bool skip = std::getenv("LIVEMIG_FUZZ_SKIP_KNOWN") != nullptr;
  return skip;
}

bool listed(std::string_view op, std::span<const std::string_view> ops) {
  return std::ranges::find(ops, op) != ops.end();
}

// A plugin as livemig_plugin.cpp's config_complete builds it, without nbdkit,
// sockets or threads.
struct Plugin {
  TempDir dir;
  PluginState st;

  Plugin() {
    st.config.image = dir / "image";
    {
      std::ofstream f(st.config.image, std::ios::binary);
      std::string block(4096, 'x');
      for (int i = 0; i < 16; ++i) f << block;
    }
    st.config.block_size = 4096;
    st.config.segment_size = 16384;
    st.image.emplace(std::move(ImageFile::open(st.config.image, false).value()));
    st.geometry.emplace(SegmentGeometry::make(st.image->size(), 4096, 16384).value());
    st.heat = std::make_unique<HeatMap>(*st.geometry, st.config.heat_half_life);
    st.heat->record_read(0, 8192);
    st.heat->record_write(20000, 100);
    EngineContext ctx;
    ctx.image = &*st.image;
    ctx.geometry = &*st.geometry;
    ctx.heat_slot = &st.heat;
    ctx.secret = Secret::from_bytes("fuzz-control: no peer ever sees this key").value();
    ctx.state_path = dir / "image.livemig-state";
    st.engine = std::make_unique<MigrationEngine>(std::move(ctx));
    Status s = st.engine->recover();
    FUZZ_CHECK(s.is_ok(), "engine recovery: %s", s.message().c_str());
  }
};

Plugin& plugin() {
  static Plugin* p = new Plugin;  // never destroyed: the fuzzer exits without unwinding
  return *p;
}

// Nesting of arrays and objects in v (1 for [] or {}), without recursion.
int depth_of(const json& v) {
  int max = 0;
  std::vector<std::pair<const json*, int>> todo{{&v, 1}};
  while (!todo.empty()) {
    auto [j, d] = todo.back();
    todo.pop_back();
    if (!j->is_structured()) continue;
    max = std::max(max, d);
    for (const json& child : *j) todo.push_back({&child, d + 1});
  }
  return max;
}

void check_json_limits(std::string_view text) {
  // Strict JSON (what the plugin's control socket parses): the scan must
  // agree with the depth of the value. nlohmann's lexer takes a NUL byte for
  // the end of the input, and the scan reads on past it (it can only refuse
  // more), so compare on the text before the first NUL.
  const std::string_view upto_nul = text.substr(0, text.find('\0'));
  json strict = json::parse(upto_nul, nullptr, /*allow_exceptions=*/false);
  if (!strict.is_discarded()) {
    const int d = depth_of(strict);
    for (int limit : {kMaxJsonDepth, d, d - 1})
      FUZZ_CHECK(limit < 0 || json_depth_within(upto_nul, limit) == (d <= limit),
                 "json_depth_within(limit %d) is %d for valid JSON of depth %d", limit,
                 json_depth_within(upto_nul, limit), d);
  }
  // parse_json_object (strict JSON, the limit kept by the parser): what it returns is an object within the limit.
  json obj = parse_json_object(text);
  if (obj.is_discarded()) return;
  FUZZ_CHECK(obj.is_object(), "parse_json_object returned a %s", obj.type_name());
  // open/fuzz_control/json-comment-hides-nesting
  FUZZ_CHECK(skip_known() || depth_of(obj) <= kMaxJsonDepth, "parse_json_object accepted nesting %d > %d",
             depth_of(obj), kMaxJsonDepth);

  Result<MigrationParams> p = Status::error("unset");
  try {
    p = MigrationParams::from_json(obj, HandoverPolicy::Explicit);
  } catch (const std::exception& e) {
    // open/fuzz_control/migrate-params-string-weight-throws
    FUZZ_CHECK(skip_known(), "MigrationParams::from_json threw instead of returning an error: %s", e.what());
    return;
  }
  if (!p) {
    FUZZ_CHECK(p.status().message().starts_with("migrate: "), "from_json error does not name the op: %s",
               p.status().message().c_str());
    return;
  }
  json once = p->to_json();
  Result<MigrationParams> again = MigrationParams::from_json(once, HandoverPolicy::Auto);
  FUZZ_CHECK(again.is_ok(), "from_json refuses its own to_json %s: %s",
             once.dump(-1, ' ', false, json::error_handler_t::replace).c_str(), again.status().message().c_str());
  FUZZ_CHECK(again->to_json() == once, "to_json -> from_json changes %s",
             once.dump(-1, ' ', false, json::error_handler_t::replace).c_str());
}

// True if handle_control_request may see `text`: it is refused before any
// handler runs, or names an op that stays on this machine.
bool safe_for_plugin(std::string_view text, std::string* op_name) {
  // The same checks, in the same order, as control_ops.cpp's dispatch().
  if (!json_depth_within(text)) return true;
  json req = json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (req.is_discarded() || !req.is_object()) return true;
  auto op = req.find("op");
  if (op == req.end() || !op->is_string()) return true;
  *op_name = op->get<std::string>();
  if (skip_known() && *op_name == "verify") {
    // open/fuzz_control/verify-float-offset: a number that is no u64 is UB.
    for (const char* key : {"offset", "length", "range_size"})
      if (req.contains(key) && req[key].is_number_float()) return false;
  }
  return !listed(*op_name, kNetworkOps);
}

void check_reply(const std::string& op, const std::string& reply) {
  FUZZ_CHECK(reply.find('\n') == std::string::npos, "a reply spans lines: %s", reply.c_str());
  json r = json::parse(reply, nullptr, /*allow_exceptions=*/false);
  FUZZ_CHECK(r.is_object(), "the reply is not a JSON object: %s", reply.c_str());
  auto ok = r.find("ok");
  FUZZ_CHECK(ok != r.end() && ok->is_boolean(), "the reply has no \"ok\" boolean: %s", reply.c_str());
  if (!ok->get<bool>()) {
    auto err = r.find("error");
    FUZZ_CHECK(err != r.end() && err->is_string() && !err->get<std::string>().empty(),
               "a failed reply has no \"error\": %s", reply.c_str());
  }
  // An op this target does not know must be one the plugin does not know either.
  if (!op.empty() && !listed(op, kLocalOps))
    FUZZ_CHECK(!ok->get<bool>() && r.value("error", "").starts_with("unknown op"),
               "op \"%s\" is neither local nor a network op here: classify it in fuzz_control.cpp (reply %s)",
               op.c_str(), reply.c_str());
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  plugin();
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::string_view text(reinterpret_cast<const char*>(data), size);
  check_json_limits(text);
  std::string op;
  if (!safe_for_plugin(text, &op)) return 0;
  check_reply(op, handle_control_request(plugin().st, text));
  return 0;
}
