#include "common/control_reply.h"

#include <cerrno>

#include <fmt/format.h>

#include "common/json_limits.h"
#include "common/protocol_format.h"

namespace livemig {

Result<std::string> control_reply_text(Result<PeerLink::Frame> frame) {
  if (!frame) return frame.status();
  auto* reply = std::get_if<ControlReplyPayload>(&frame->message);
  if (!reply)
    return Status::error(fmt::format("unexpected {} frame in reply to a CONTROL request",
                                     frame_type_name(frame->header.type)),
                         EPROTO);
  return reply->json;
}

Result<nlohmann::json> parse_control_reply(const Result<std::string>& text, const std::string& label) {
  if (!text) return Status::error(fmt::format("{}: {}", label, text.status().message()), text.status().errno_value());
  nlohmann::json reply = parse_json_object(*text);
  if (reply.is_discarded())
    return Status::error(fmt::format("{}: the reply is not a JSON object (of at most {} levels): {:.120}", label,
                                     kMaxJsonDepth, *text),
                         EPROTO);
  return reply;
}

Result<nlohmann::json> control_reply_json(Result<PeerLink::Frame> reply, const std::string& label) {
  return parse_control_reply(control_reply_text(std::move(reply)), label);
}

}  // namespace livemig
