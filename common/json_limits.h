// Parsing JSON that a peer or a client sent: bounded nesting, so that a
// deeply nested text cannot make the recursive copy or dump of the value
// overflow the stack of the process serving the VM.
#pragma once

#include <string_view>

#include <nlohmann/json.hpp>

namespace livemig {

// Nesting of arrays and objects that any JSON text we take may have.
inline constexpr int kMaxJsonDepth = 32;

// True if `text` nests arrays and objects at most max_depth deep (a scan
// that skips strings; it does not check the rest of the syntax).
bool json_depth_within(std::string_view text, int max_depth = kMaxJsonDepth);

// The JSON object in `text`, or a discarded value if the text is not a JSON
// object or nests deeper than max_depth.
nlohmann::json parse_json_object(std::string_view text, int max_depth = kMaxJsonDepth);

}  // namespace livemig
