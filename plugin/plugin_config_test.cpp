#include "plugin/plugin_config.h"

#include <catch2/catch.hpp>

#include <cstdlib>
#include <cstring>
#include <map>
#include <string>
#include <vector>

using namespace livemig;

namespace {

// Fakes of nbdkit's parsers for the values these tests use, read as
// nbdkit-plugin(3) documents them ("4k" is 4096, "t" and "on" are true, -FD
// reads the password from a descriptor). Every other value is refused, as
// nbdkit refuses a bad one: -1, and the call is recorded in place of
// nbdkit_error's message.
std::vector<std::string> refused;

int64_t fake_parse_size(const char* str) {
  static const std::map<std::string, int64_t> known{
      {"4k", 4096}, {"4K", 4096}, {"4096", 4096}, {"4s", 2048}, {"64K", 65536}, {"1M", 1 << 20}, {"256", 256}};
  auto it = known.find(str);
  if (it != known.end()) return it->second;
  refused.push_back(std::string("size ") + str);
  return -1;
}

int fake_parse_bool(const char* str) {
  static const std::map<std::string, int> known{{"on", 1}, {"t", 1}, {"Yes", 1}, {"off", 0}, {"n", 0}};
  auto it = known.find(str);
  if (it != known.end()) return it->second;
  refused.push_back(std::string("bool ") + str);
  return -1;
}

int fake_read_password(const char* value, char** password) {
  static const std::map<std::string, std::string> known{
      {"-7", "0123456789abcdef-from-fd"}, {"+/keys/psk", "0123456789abcdef-from-file"}, {"-8", "short"}};
  *password = nullptr;
  auto it = known.find(value);
  if (it == known.end()) {
    refused.push_back(std::string("password ") + value);
    return -1;
  }
  *password = strdup(it->second.c_str());
  return 0;
}

const NbdkitParsers kFakes{fake_parse_size, fake_parse_bool, fake_read_password};

PluginConfig with(std::initializer_list<std::pair<const char*, const char*>> keys) {
  PluginConfig c;
  for (auto& [k, v] : keys) REQUIRE(c.set(k, v, kFakes));
  return c;
}

std::string error_of(const char* key, const char* value) {
  refused.clear();
  PluginConfig c;
  Status s = c.set(key, value, kFakes);
  REQUIRE_FALSE(s);
  return s.message();
}

}  // namespace

TEST_CASE("plugin keys: sizes are what nbdkit_parse_size reads") {
  PluginConfig c = with({{"block-size", "4k"}, {"segment-size", "1M"}});
  CHECK(c.block_size == 4096);
  CHECK(c.segment_size == 1u << 20);
  CHECK(with({{"block-size", "4s"}}).block_size == 2048);  // nbdkit's sectors, not livemig's own reading
}

TEST_CASE("plugin keys: a size nbdkit refuses is an error naming the key, after nbdkit's own") {
  CHECK(error_of("block-size", "4x") == "block-size=4x: not a size");
  CHECK(refused == std::vector<std::string>{"size 4x"});
  CHECK(error_of("segment-size", "") == "segment-size=: not a size");
}

TEST_CASE("plugin keys: a size nbdkit reads is still checked against livemig's limits") {
  PluginConfig c = with({{"image", "/vm.img"}, {"block-size", "256"}});
  Status s = c.complete();
  REQUIRE_FALSE(s);
  CHECK_THAT(s.message(), Catch::Contains("512"));
}

TEST_CASE("plugin keys: booleans are what nbdkit_parse_bool reads") {
  CHECK(with({{"readonly", "on"}}).readonly);
  CHECK(with({{"readonly", "t"}}).readonly);
  CHECK(with({{"readonly", "Yes"}}).readonly);
  CHECK_FALSE(with({{"readonly", "on"}, {"readonly", "n"}}).readonly);
  CHECK(error_of("readonly", "maybe") == "readonly=maybe: not a boolean");
  CHECK(refused == std::vector<std::string>{"bool maybe"});
}

TEST_CASE("plugin keys: secret=FILE is a key file path, not read as a password") {
  refused.clear();
  PluginConfig c = with({{"secret", "/etc/livemig/psk"}});
  CHECK(c.secret_path == "/etc/livemig/psk");
  CHECK(c.secret.empty());
  CHECK(refused.empty());
}

TEST_CASE("plugin keys: secret=+FILE and secret=-FD are read by nbdkit_read_password") {
  PluginConfig file = with({{"secret", "+/keys/psk"}});
  CHECK(std::string(reinterpret_cast<const char*>(file.secret.data()), file.secret.size()) ==
        "0123456789abcdef-from-file");
  CHECK(file.secret_path == "/keys/psk");
  PluginConfig fd = with({{"secret", "-7"}});
  CHECK(fd.secret.size() == std::strlen("0123456789abcdef-from-fd"));
  CHECK(fd.secret_path.empty());
  // A later plain secret= replaces the key read before.
  PluginConfig both = with({{"secret", "-7"}, {"secret", "/etc/livemig/psk"}});
  CHECK(both.secret.empty());
  CHECK(both.secret_path == "/etc/livemig/psk");
}

TEST_CASE("plugin keys: a key nbdkit_read_password cannot read, or a short one, names secret=") {
  CHECK(error_of("secret", "-9") == "secret=-9: cannot read the key");
  CHECK(refused == std::vector<std::string>{"password -9"});
  CHECK_THAT(error_of("secret", "-8"), Catch::StartsWith("secret=-8: the key is 5 bytes"));
}

TEST_CASE("plugin keys: a key read by nbdkit_read_password serves a non-loopback listen=") {
  PluginConfig c = with({{"image", "/vm.img"}, {"listen", "192.0.2.1:10809"}, {"tls", "off"}});
  CHECK_THAT(c.complete().message(), Catch::Contains("secret=<FILE> is required"));
  REQUIRE(c.set("secret", "-7", kFakes));
  CHECK(c.complete());
}
