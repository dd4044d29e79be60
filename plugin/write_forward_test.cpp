#include "plugin/write_forward.h"

#include <catch2/catch.hpp>

#include "tests/support/link_pair.h"

using namespace livemig;

TEST_CASE("forwarded writes: a flush over the link that carried them covers them") {
  LinkPair pair(test_secret(), test_secret());
  ForwardedWrites w;
  uint64_t mark = 0;
  CHECK(w.flush_may_cover(pair.client, &mark));  // nothing written
  w.acknowledged(pair.client, false);
  w.acknowledged(pair.client, false);
  REQUIRE(w.flush_may_cover(pair.client, &mark));
  CHECK(mark == 2);
  w.flushed(mark);
  CHECK_FALSE(w.failing());
}

// Found by issue #17's tests: writes acknowledged by a destination that was
// then killed, flushed through its restarted process, were reported durable.
TEST_CASE("forwarded writes: unflushed writes on a replaced link fail the flush, and every flush until the clients go") {
  LinkPair before(test_secret(), test_secret()), after(test_secret(), test_secret());
  ForwardedWrites w;
  uint64_t mark = 0;
  w.acknowledged(before.client, false);
  CHECK_FALSE(w.flush_may_cover(after.client, &mark));
  CHECK(w.failing());
  CHECK_FALSE(w.flush_may_cover(after.client, &mark));  // sticky: a later OK would claim the lost writes
  w.acknowledged(after.client, false);
  CHECK_FALSE(w.flush_may_cover(after.client, &mark));
  w.clients_gone();
  CHECK_FALSE(w.failing());
  CHECK(w.flush_may_cover(after.client, &mark));
}

TEST_CASE("forwarded writes: FUA writes and flushed writes do not hold a later link's flush") {
  LinkPair before(test_secret(), test_secret()), after(test_secret(), test_secret());
  ForwardedWrites w;
  uint64_t mark = 0;
  w.acknowledged(before.client, true);  // FUA: durable on its own
  CHECK(w.flush_may_cover(after.client, &mark));
  w.acknowledged(before.client, false);
  REQUIRE(w.flush_may_cover(before.client, &mark));
  w.flushed(mark);
  w.acknowledged(after.client, false);
  CHECK(w.flush_may_cover(after.client, &mark));
  // Unflushed writes on two links: a flush over either cannot cover both.
  w.acknowledged(before.client, false);
  CHECK_FALSE(w.flush_may_cover(after.client, &mark));
}
