// The answer to a CONTROL request made over the peer protocol: the
// CONTROL_REPLY frame's JSON object, or an error that names the target.
// migrate-nbd's and livemigd's ControlClient, livemigd's heartbeats and the
// plugin's calls to a group's coordinator all read replies this way.
#pragma once

#include <string>

#include <nlohmann/json.hpp>

#include "common/peer_link.h"
#include "common/status.h"

namespace livemig {

// The JSON text of `frame`, which must be a CONTROL_REPLY (EPROTO otherwise).
Result<std::string> control_reply_text(Result<PeerLink::Frame> frame);

// `text` as a JSON object (at most kMaxJsonDepth levels). Errors start with
// `label` (the target, e.g. "127.0.0.1:10809").
Result<nlohmann::json> parse_control_reply(const Result<std::string>& text, const std::string& label);

// Both of the above.
Result<nlohmann::json> control_reply_json(Result<PeerLink::Frame> reply, const std::string& label);

}  // namespace livemig
