#include "plugin/group_decisions.h"

#include <unistd.h>

#include <fstream>
#include <sstream>
#include <string>

#include <catch2/catch.hpp>

#include "tests/support/temp_dir.h"

using namespace livemig;

namespace {

// The record in a fresh directory, removed with it.
struct TempPath {
  TempDir dir;
  std::string path = dir / "img.livemig-groups";
  std::string read() const {
    std::ifstream in(path);
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  }
};

}  // namespace

TEST_CASE("group decisions: an unknown group is undecided, and no file is made for asking") {
  TempPath t;
  GroupDecisions d(t.path);
  auto o = d.outcome("g1");
  REQUIRE(o);
  CHECK(!o->has_value());
  CHECK(::access(t.path.c_str(), F_OK) != 0);
}

TEST_CASE("group decisions: the first decision wins, a later different one gets the recorded one") {
  TempPath t;
  GroupDecisions d(t.path);
  auto first = d.decide("g1", GroupDecision::Commit);
  REQUIRE(first);
  CHECK(first->decision == GroupDecision::Commit);
  CHECK(first->now);
  auto second = d.decide("g1", GroupDecision::Abort);
  REQUIRE(second);
  CHECK(second->decision == GroupDecision::Commit);
  CHECK(!second->now);
  CHECK(**d.outcome("g1") == GroupDecision::Commit);
  CHECK(t.read() == "commit g1\n");
}

TEST_CASE("group decisions: a decision survives a restart (a new object reads the file)") {
  TempPath t;
  {
    GroupDecisions d(t.path);
    REQUIRE(d.decide("a", GroupDecision::Abort));
    REQUIRE(d.decide("b", GroupDecision::Commit));
  }
  GroupDecisions again(t.path);
  CHECK(**again.outcome("a") == GroupDecision::Abort);
  CHECK(**again.outcome("b") == GroupDecision::Commit);
  auto late = again.decide("a", GroupDecision::Commit);
  REQUIRE(late);
  CHECK(late->decision == GroupDecision::Abort);
}

TEST_CASE("group decisions: a line cut short by a crash is dropped, and the next record starts a line") {
  TempPath t;
  {
    std::ofstream out(t.path);
    out << "commit g1\ncommit g2";  // g2 never reached its newline: never answered
  }
  GroupDecisions d(t.path);
  CHECK(**d.outcome("g1") == GroupDecision::Commit);
  CHECK(!d.outcome("g2")->has_value());
  REQUIRE(d.decide("g2", GroupDecision::Abort));
  CHECK(t.read() == "commit g1\nabort g2\n");
}

TEST_CASE("group decisions: a damaged file is an error that names it, not a guess") {
  TempPath t;
  {
    std::ofstream out(t.path);
    out << "maybe g1\n";
  }
  GroupDecisions d(t.path);
  auto o = d.outcome("g1");
  REQUIRE(!o);
  CHECK(o.status().message().find(t.path) != std::string::npos);
}

TEST_CASE("group decisions: group ids and decisions are checked") {
  CHECK(check_group_id("vm7-2026.12.02:1_a"));
  CHECK(!check_group_id(""));
  CHECK(!check_group_id("a b"));
  CHECK(!check_group_id("a\nabort b"));
  CHECK(!check_group_id(std::string(129, 'x')));
  CHECK(*parse_group_decision("commit") == GroupDecision::Commit);
  CHECK(*parse_group_decision("abort") == GroupDecision::Abort);
  CHECK(!parse_group_decision("undecided"));
  TempPath t;
  GroupDecisions d(t.path);
  CHECK(!d.decide("a b", GroupDecision::Commit));
}
