#include "common/connection_limit.h"

#include <vector>

#include <catch2/catch.hpp>

using livemig::ConnectionLimit;

TEST_CASE("connection limit: caps the total and each source, and frees slots when tokens go") {
  ConnectionLimit limit(4, 2);
  std::vector<std::shared_ptr<void>> held;
  held.push_back(limit.acquire("10.0.0.1"));
  held.push_back(limit.acquire("10.0.0.1"));
  CHECK(held[0]);
  CHECK(held[1]);
  CHECK_FALSE(limit.acquire("10.0.0.1"));  // per source
  held.push_back(limit.acquire("10.0.0.2"));
  held.push_back(limit.acquire("10.0.0.3"));
  CHECK_FALSE(limit.acquire("10.0.0.4"));  // total
  CHECK(limit.in_use() == 4);
  CHECK(limit.refused() == 2);
  held.erase(held.begin());  // one of 10.0.0.1's handshakes ended
  CHECK(limit.in_use() == 3);
  auto again = limit.acquire("10.0.0.1");
  CHECK(again);
  held.clear();
  again.reset();
  CHECK(limit.in_use() == 0);
}
