#include "plugin/destination_io_trigger.h"

#include <catch2/catch.hpp>

using livemig::DestinationIoTrigger;
using namespace std::chrono_literals;

namespace {
const DestinationIoTrigger::Clock::time_point t0{std::chrono::seconds(100)};
}

TEST_CASE(
    "on-destination-io: no forwarded write, no handover however quiet "
    "the source is") {
  DestinationIoTrigger t(t0);
  CHECK_FALSE(t.due(t0 + 3600s));
}

TEST_CASE(
    "on-destination-io: forwarded writes and a source quiet for 1 s hand "
    "over") {
  DestinationIoTrigger t(t0);
  t.note_local(t0 + 1s);
  t.note_forwarded(t0 + 1500ms);
  CHECK_FALSE(t.due(t0 + 1900ms));  // the source wrote 0.9 s ago
  CHECK(t.due(t0 + 2s));
  CHECK(t.forwarded_requests() == 1);
  CHECK(t.local_quiet(t0 + 2s) == 1000ms);
}

TEST_CASE(
    "on-destination-io: a source that wrote after the destination keeps "
    "the disk, idle or not") {
  DestinationIoTrigger t(t0);
  t.note_forwarded(t0 + 1s);  // a probe on the destination
  t.note_local(t0 + 2s);      // the VM still runs at the source
  CHECK_FALSE(t.due(t0 + 60s));
  t.note_forwarded(t0 + 61s);  // now the destination writes again, the source has been quiet
  CHECK(t.due(t0 + 61s));
}

TEST_CASE(
    "on-destination-io: the quiet period counts from the migration's "
    "start if the source never wrote") {
  DestinationIoTrigger t(t0, 500ms);
  t.note_forwarded(t0 + 100ms);
  CHECK_FALSE(t.due(t0 + 400ms));
  CHECK(t.due(t0 + 500ms));
}
