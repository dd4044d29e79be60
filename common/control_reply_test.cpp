#include "common/control_reply.h"

#include <cerrno>
#include <string>

#include <catch2/catch.hpp>

#include "common/protocol_format.h"

using namespace livemig;

namespace {

PeerLink::Frame frame_of(AnyPayload message, FrameType type) {
  PeerLink::Frame f;
  f.header.type = type;
  f.message = std::move(message);
  return f;
}

}  // namespace

TEST_CASE("control reply: a CONTROL_REPLY's JSON object is the answer") {
  auto j = control_reply_json(frame_of(ControlReplyPayload{R"({"ok":true,"phase":"Sync"})"}, FrameType::ControlReply),
                              "10.0.0.1:10809");
  REQUIRE(j);
  CHECK((*j)["phase"] == "Sync");
}

TEST_CASE("control reply: another frame type, text that is not an object and a failed call name the target") {
  auto other = control_reply_json(frame_of(HeartbeatPayload{7}, FrameType::Heartbeat), "10.0.0.1:10809");
  REQUIRE_FALSE(other);
  CHECK(other.status().errno_value() == EPROTO);
  CHECK_THAT(other.status().message(), Catch::Contains("10.0.0.1:10809") && Catch::Contains("unexpected") &&
                                           Catch::Contains("CONTROL request"));

  auto array = control_reply_json(frame_of(ControlReplyPayload{"[1,2]"}, FrameType::ControlReply), "coordinator");
  REQUIRE_FALSE(array);
  CHECK(array.status().errno_value() == EPROTO);
  CHECK_THAT(array.status().message(), Catch::StartsWith("coordinator: the reply is not a JSON object"));

  auto failed = control_reply_json(Status::error("no answer within 5 s", ETIMEDOUT), "coordinator");
  REQUIRE_FALSE(failed);
  CHECK(failed.status().errno_value() == ETIMEDOUT);
  CHECK(failed.status().message() == "coordinator: no answer within 5 s");
}
