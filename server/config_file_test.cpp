#include "server/config_file.h"

#include <catch2/catch.hpp>

using livemig::daemon::parse_config_text;
using livemig::daemon::read_config_file;

namespace {

std::string error_of(std::string_view text) {
  auto r = parse_config_text("/etc/livemig/livemigd.conf", text);
  REQUIRE_FALSE(r);
  return r.status().message();
}

}  // namespace

TEST_CASE("config file: key = value lines, comments and blank lines") {
  auto r = parse_config_text("c.conf",
                             "# livemigd\n"
                             "\n"
                             "database = /var/lib/livemig/q.db\n"
                             "  max-concurrent=2  \r\n"
                             "socket = \"/run/livemig/a b.sock\"\n"
                             "tls-psk-identity = 'x=y'");
  REQUIRE(r);
  REQUIRE(r->size() == 4);
  CHECK((*r)[0].line == 3);
  CHECK((*r)[0].key == "database");
  CHECK((*r)[0].value == "/var/lib/livemig/q.db");
  CHECK((*r)[1].line == 4);
  CHECK((*r)[1].key == "max-concurrent");
  CHECK((*r)[1].value == "2");
  CHECK((*r)[2].value == "/run/livemig/a b.sock");
  CHECK((*r)[3].key == "tls-psk-identity");
  CHECK((*r)[3].value == "x=y");
}

TEST_CASE("config file: a line without = names the file, the line and what it holds") {
  CHECK(error_of("database = /q.db\nbogus\n") ==
        "/etc/livemig/livemigd.conf line 2: 'bogus': expected `key = value` (no '=' on the line)");
}

TEST_CASE("config file: an empty key, an empty value, a section and a repeated key are errors naming the line") {
  CHECK(error_of("= 3") == "/etc/livemig/livemigd.conf line 1: '= 3': no key before '='");
  CHECK(error_of("\n\nmax-concurrent =\n") ==
        "/etc/livemig/livemigd.conf line 3: max-concurrent: no value after '=' (comment the line out to keep the "
        "default)");
  CHECK_THAT(error_of("[daemon]\nmax-concurrent = 2\n"),
             Catch::StartsWith("/etc/livemig/livemigd.conf line 1: [daemon]: livemigd's configuration has no sections"));
  CHECK(error_of("retry-delay = 1\n# again\nretry-delay = 2\n") ==
        "/etc/livemig/livemigd.conf line 3: retry-delay: given twice (first on line 1)");
}

TEST_CASE("config file: a missing file is named") {
  auto r = read_config_file("/nonexistent/livemigd.conf");
  REQUIRE_FALSE(r);
  CHECK(r.status().message() == "configuration file /nonexistent/livemigd.conf: No such file or directory");
}
