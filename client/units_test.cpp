// Unit tests of SIZE and RATE parsing and of the forms shown to people.
#include "client/units.h"

#include <string>

#include <catch2/catch.hpp>

using namespace livemig::client;

TEST_CASE("a size takes binary suffixes K, M, G, T") {
  CHECK(*parse_size("4096", "x") == 4096);
  CHECK(*parse_size("64K", "x") == 64 * 1024);
  CHECK(*parse_size("64k", "x") == 64 * 1024);
  CHECK(*parse_size("512M", "x") == 512ull << 20);
  CHECK(*parse_size("2G", "x") == 2ull << 30);
  CHECK(*parse_size("1T", "x") == 1ull << 40);
  CHECK(*parse_size("1.5G", "x") == 3ull << 29);
  CHECK(*parse_size("64MiB", "x") == 64ull << 20);
  CHECK(*parse_size("0", "x") == 0);
}

TEST_CASE("a bad size is an error naming the option and the value") {
  for (const char* bad : {"", "M", "12Q", "-1", "1..5M", "1 2", "0x10"}) {
    auto r = parse_size(bad, "--handover-size");
    REQUIRE_FALSE(r);
    CHECK(r.status().message().find("--handover-size") != std::string::npos);
    CHECK(r.status().message().find(std::string("'") + bad + "'") != std::string::npos);
  }
}

TEST_CASE("a rate is bytes/s with binary suffixes or bits/s with decimal ones") {
  CHECK(*parse_rate("100M", "x") == 100ull << 20);
  CHECK(*parse_rate("100M/s", "x") == 100ull << 20);
  CHECK(*parse_rate("100MB/s", "x") == 100ull << 20);
  CHECK(*parse_rate("1Gbit", "x") == 125'000'000);
  CHECK(*parse_rate("1gbit/s", "x") == 125'000'000);
  CHECK(*parse_rate("1Gbps", "x") == 125'000'000);
  CHECK(*parse_rate("500Mbit", "x") == 62'500'000);
  CHECK(*parse_rate("800kbit", "x") == 100'000);
  CHECK(*parse_rate("0", "x") == 0);
  CHECK_FALSE(parse_rate("fast", "--max-rate"));
  CHECK_FALSE(parse_rate("1Xbit", "--max-rate"));
}

TEST_CASE("sizes, rates and times are shown for people") {
  CHECK(format_bytes(512) == "512 B");
  CHECK(format_bytes(64 << 20) == "64 MiB");
  CHECK(format_bytes(1536) == "1.50 KiB");
  CHECK(format_rate(110.5 * (1 << 20)) == "110 MiB/s");
  CHECK(format_seconds(0.25) == "250 ms");
  CHECK(format_seconds(42) == "42 s");
  CHECK(format_seconds(187) == "3m07s");
  CHECK(format_seconds(-1) == "-");
  CHECK(format_ms(-1) == "-");
  CHECK(format_ms(12) == "12 ms");
}
