#include "common/migration_params.h"

#include <catch2/catch.hpp>

using livemig::MigrationParams;
using nlohmann::json;

TEST_CASE("migration params: a valid request parses and round-trips") {
  auto p = MigrationParams::from_json({{"to", "127.0.0.1:10809"}, {"mode", "livefs"}, {"threshold", "max"}}, livemig::HandoverPolicy::Auto);
  REQUIRE(p);
  CHECK(p->mode() == livemig::MigrationMode::Livefs);
  CHECK(p->handover == livemig::HandoverPolicy::Auto);
  auto again = MigrationParams::from_json(p->to_json(), livemig::HandoverPolicy::Explicit);
  REQUIRE(again);
  CHECK(again->to_json() == p->to_json());
}

TEST_CASE("migration params: a bad mode or parameter is refused by name") {
  auto mode = MigrationParams::from_json({{"to", "127.0.0.1:1"}, {"mode", "teleport"}}, livemig::HandoverPolicy::Explicit);
  REQUIRE_FALSE(mode);
  CHECK(mode.status().message().find("teleport") != std::string::npos);
  auto unit = MigrationParams::from_json({{"to", "127.0.0.1:1"}, {"transfer_unit", 3000}}, livemig::HandoverPolicy::Explicit);
  REQUIRE_FALSE(unit);
  CHECK(unit.status().message().find("transfer_unit") != std::string::npos);
  auto to = MigrationParams::from_json({{"mode", "precopy"}}, livemig::HandoverPolicy::Explicit);
  REQUIRE_FALSE(to);
  CHECK(to.status().message().find("\"to\"") != std::string::npos);
}

// fuzz_control: {"w_read":"x"} threw nlohmann's type_error out of from_json
// (value() on a string), which ended the control request's thread.
TEST_CASE("migration params: a weight that is not a number is refused by name") {
  auto weight = MigrationParams::from_json({{"to", "h:1"}, {"w_read", "x"}}, livemig::HandoverPolicy::Explicit);
  REQUIRE_FALSE(weight);
  CHECK(weight.status().message().find("w_read") != std::string::npos);
  auto negative = MigrationParams::from_json({{"to", "h:1"}, {"max_rate", -5}}, livemig::HandoverPolicy::Explicit);
  CHECK_FALSE(negative);
}

TEST_CASE("migration params: compression is auto by default, and each setting round-trips") {
  using livemig::Compression;
  auto dflt = MigrationParams::from_json({{"to", "h:1"}}, livemig::HandoverPolicy::Explicit);
  REQUIRE(dflt);
  CHECK(dflt->compression.kind == Compression::Kind::Auto);
  for (const char* s : {"auto", "off", "zstd:1", "zstd:-7", "zstd:19"}) {
    auto p = MigrationParams::from_json({{"to", "h:1"}, {"compression", s}}, livemig::HandoverPolicy::Explicit);
    REQUIRE(p);
    CHECK(p->to_json()["compression"] == s);
  }
  auto plain = livemig::parse_compression("zstd");
  REQUIRE(plain);
  CHECK(*plain == Compression{Compression::Kind::Zstd, 1});
}

TEST_CASE("migration params: a compression setting that is not one names the choices") {
  for (const char* s : {"gzip", "zstd:", "zstd:20", "zstd:-8", "zstd:1x", "zstd:+", "ZSTD", ""}) {
    auto p = MigrationParams::from_json({{"to", "h:1"}, {"compression", s}}, livemig::HandoverPolicy::Explicit);
    REQUIRE_FALSE(p);
    CHECK(p.status().message().find("compression") != std::string::npos);
    CHECK(p.status().message().find("zstd:LEVEL") != std::string::npos);
  }
}

TEST_CASE("migration params: migration_nice is 0 by default, from 0 to 19, and round-trips") {
  auto dflt = MigrationParams::from_json({{"to", "h:1"}, {"mode", "auto"}}, livemig::HandoverPolicy::Explicit);
  REQUIRE(dflt);
  CHECK(dflt->migration_nice == 0);
  for (int nice : {0, 7, 19}) {
    auto p = MigrationParams::from_json({{"to", "h:1"}, {"migration_nice", nice}}, livemig::HandoverPolicy::Explicit);
    REQUIRE(p);
    CHECK(p->migration_nice == nice);
    auto again = MigrationParams::from_json(p->to_json(), livemig::HandoverPolicy::Explicit);
    REQUIRE(again);
    CHECK(again->migration_nice == nice);
  }
  for (json bad : {json(20), json(-1), json(2.5), json("low")}) {
    auto p = MigrationParams::from_json({{"to", "h:1"}, {"migration_nice", bad}}, livemig::HandoverPolicy::Explicit);
    REQUIRE_FALSE(p);
    CHECK(p.status().message().find("\"migration_nice\" must be an integer from 0 to 19") != std::string::npos);
  }
}
