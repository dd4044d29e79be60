#include "common/json_limits.h"

#include <string>

#include <catch2/catch.hpp>
#include <fmt/format.h>

using livemig::json_depth_within;
using livemig::parse_json_object;

TEST_CASE("json limits: a text nested deeper than the limit is refused before it is parsed") {
  std::string deep = std::string(100000, '[') + std::string(100000, ']');
  CHECK_FALSE(json_depth_within(deep));
  CHECK(parse_json_object("{\"a\":" + deep + "}").is_discarded());
  std::string ok = "{\"a\":" + std::string(20, '[') + std::string(20, ']') + "}";
  CHECK(json_depth_within(ok));
  CHECK(parse_json_object(ok).is_object());
}

TEST_CASE("json limits: brackets inside strings do not count, escaped quotes do not end a string") {
  CHECK(json_depth_within(R"({"a":"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["})", 4));
  CHECK(json_depth_within(R"({"a":"\"[[[[[[[[[[[[["})", 2));
  CHECK_FALSE(json_depth_within(R"({"a":"\\",  "b":[[[[]]]]})", 3));
}

TEST_CASE("json limits: only objects are taken") {
  CHECK(parse_json_object("[1,2]").is_discarded());
  CHECK(parse_json_object("not json").is_discarded());
  CHECK(parse_json_object("{\"phase\":\"PreCopy\"}").value("phase", "") == "PreCopy");
}

// fuzz_control: with comments allowed, `/*"*/` hid forty brackets from the
// depth scan (it took the quote for a string's start) while the parser
// skipped the comment and built the deep value.
TEST_CASE("json limits: a comment cannot hide nesting; the parser itself enforces the depth") {
  const std::string hidden = R"({"a":/*"*/)" + std::string(40, '[') + std::string(40, ']') + R"(/*"*/})";
  CHECK(parse_json_object(hidden).is_discarded());
  // The limit holds whatever the scan says: exactly max_depth levels pass, one more does not.
  auto nested = [](int levels) { return "{\"a\":" + std::string(levels - 1, '[') + std::string(levels - 1, ']') + "}"; };
  CHECK(parse_json_object(nested(5), 5).is_object());
  CHECK(parse_json_object(nested(6), 5).is_discarded());
  CHECK(livemig::parse_json("[[1]]", 2).is_array());
  CHECK(livemig::parse_json("[[[1]]]", 2).is_discarded());
}

// fuzz_control: verify's "offset" was read with value<uint64_t>(), which
// converts a float such as 2.2e104 to an integer: undefined behaviour.
TEST_CASE("json limits: json_uint takes a non-negative integer only, json_number any number") {
  const auto req = nlohmann::json::parse(R"({"big":2.2e104,"neg":-1,"str":"7","ok":42,"null":null,"w":0.25})");
  CHECK_FALSE(livemig::json_uint(req, "big", 0, "verify"));
  CHECK_FALSE(livemig::json_uint(req, "neg", 0, "verify"));
  auto str = livemig::json_uint(req, "str", 0, "verify");
  REQUIRE_FALSE(str);
  CHECK(str.status().message().find("\"str\"") != std::string::npos);
  CHECK(str.status().message().find("verify") != std::string::npos);
  CHECK(*livemig::json_uint(req, "ok", 0, "verify") == 42);
  CHECK(*livemig::json_uint(req, "null", 9, "verify") == 9);
  CHECK(*livemig::json_uint(req, "missing", 9, "verify") == 9);
  CHECK(*livemig::json_number(req, "w", 0.5, "migrate") == 0.25);
  CHECK(*livemig::json_number(req, "ok", 0.5, "migrate") == 42.0);
  CHECK_FALSE(livemig::json_number(req, "str", 0.5, "migrate"));
}

TEST_CASE("json limits: json_bool takes true or false only") {
  const auto req = nlohmann::json::parse(R"({"t":true,"f":false,"one":1,"str":"true","null":null})");
  CHECK(*livemig::json_bool(req, "t", false, "release") == true);
  CHECK(*livemig::json_bool(req, "f", true, "release") == false);
  CHECK(*livemig::json_bool(req, "null", true, "release") == true);
  CHECK(*livemig::json_bool(req, "missing", false, "release") == false);
  for (const char* key : {"one", "str"}) {
    auto r = livemig::json_bool(req, key, false, "release");
    REQUIRE_FALSE(r);
    CHECK(r.status().message() == fmt::format("release: \"{}\" must be true or false", key));
  }
}
