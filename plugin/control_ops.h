// The control operations, shared by the local Unix socket and (later) the
// CONTROL frames of the peer port. A request is one JSON object with an "op"
// member; the reply is one JSON object with "ok": true and the result, or
// "ok": false and an "error" that names the problem. Nothing a client sends
// can crash the plugin: every failure becomes an error reply.
#pragma once

#include <string>
#include <string_view>

#include "plugin/plugin_state.h"

namespace livemig {

// Handles one request line; returns the reply as one line of JSON (no newline).
std::string handle_control_request(PluginState& state, std::string_view line);

}  // namespace livemig
