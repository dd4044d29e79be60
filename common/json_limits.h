// Parsing JSON that a peer or a client sent: bounded nesting, so that a
// deeply nested text cannot make the recursive copy or dump of the value
// overflow the stack of the process serving the VM.
#pragma once

#include <string_view>

#include <nlohmann/json.hpp>

#include "common/status.h"

namespace livemig {

// Nesting of arrays and objects that any JSON text we take may have.
inline constexpr int kMaxJsonDepth = 32;

// True if `text` nests arrays and objects at most max_depth deep (a scan
// that skips strings; it does not check the rest of the syntax). A quick
// check for a clear message; parse_json enforces the limit itself.
bool json_depth_within(std::string_view text, int max_depth = kMaxJsonDepth);

// The JSON value in `text` (strict JSON: no comments), or a discarded value
// if the text is not JSON or nests arrays and objects deeper than max_depth.
// Every JSON text from outside the process goes through this.
nlohmann::json parse_json(std::string_view text, int max_depth = kMaxJsonDepth);

// parse_json, and a discarded value unless the text is a JSON object.
nlohmann::json parse_json_object(std::string_view text, int max_depth = kMaxJsonDepth);

// Field `key` of object `j`: `dflt` if it is missing or null; an error
// ("OP: "KEY" must be ...") if it is not a non-negative integer, resp. a
// number, a boolean. (nlohmann's value() throws on a wrong type, or converts a float
// to an integer, which is undefined for one out of range.)
Result<uint64_t> json_uint(const nlohmann::json& j, const char* key, uint64_t dflt, std::string_view op);
Result<double> json_number(const nlohmann::json& j, const char* key, double dflt, std::string_view op);
Result<bool> json_bool(const nlohmann::json& j, const char* key, bool dflt, std::string_view op);

}  // namespace livemig
