#include "common/json_limits.h"

#include <fmt/format.h>

namespace livemig {

bool json_depth_within(std::string_view text, int max_depth) {
  int depth = 0;
  bool in_string = false, escaped = false;
  for (char c : text) {
    if (in_string) {
      if (escaped) escaped = false;
      else if (c == '\\') escaped = true;
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') in_string = true;
    else if ((c == '[' || c == '{') && ++depth > max_depth) return false;
    else if (c == ']' || c == '}') --depth;
  }
  return true;
}

nlohmann::json parse_json(std::string_view text, int max_depth) {
  using nlohmann::json;
  // The parser tells the depth of every value it starts; past the limit it
  // drops the value (its callback says so) and the whole text is refused.
  // nlohmann's parser keeps its own stack on the heap, so a deep text costs
  // memory, not stack.
  bool too_deep = false;
  json::parser_callback_t limit = [&](int depth, json::parse_event_t event, json&) {
    if ((event == json::parse_event_t::object_start || event == json::parse_event_t::array_start) &&
        depth >= max_depth)
      too_deep = true;
    return !too_deep;
  };
  // Strict JSON: no comments (a comment could hide brackets from a scan of
  // the text; found by fuzz_control).
  json j = json::parse(text, limit, /*allow_exceptions=*/false, /*ignore_comments=*/false);
  if (too_deep) return json(json::value_t::discarded);
  return j;
}

Result<uint64_t> json_uint(const nlohmann::json& j, const char* key, uint64_t dflt, std::string_view op) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return dflt;
  if (!it->is_number_unsigned()) return Status::error(fmt::format("{}: \"{}\" must be a non-negative integer", op, key));
  return it->get<uint64_t>();
}

Result<double> json_number(const nlohmann::json& j, const char* key, double dflt, std::string_view op) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return dflt;
  if (!it->is_number()) return Status::error(fmt::format("{}: \"{}\" must be a number", op, key));
  return it->get<double>();
}

Result<bool> json_bool(const nlohmann::json& j, const char* key, bool dflt, std::string_view op) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return dflt;
  if (!it->is_boolean()) return Status::error(fmt::format("{}: \"{}\" must be true or false", op, key));
  return it->get<bool>();
}

nlohmann::json parse_json_object(std::string_view text, int max_depth) {
  nlohmann::json j = parse_json(text, max_depth);
  if (!j.is_object()) return nlohmann::json(nlohmann::json::value_t::discarded);
  return j;
}

}  // namespace livemig
