#include "client-tools/migrate_nbd_daemon.h"

#include <catch2/catch.hpp>
#include <fmt/format.h>

#include <string>
#include <vector>

using livemig::mig::progress_bar;
using livemig::mig::render_task_line;
using nlohmann::json;

TEST_CASE("daemon output: a progress bar fills with the blocks done") {
  CHECK(progress_bar(100, 100, 10) == "[----------]   0%");
  CHECK(progress_bar(100, 50, 10) == "[#####-----]  50%");
  CHECK(progress_bar(100, 0, 10) == "[##########] 100%");
  CHECK(progress_bar(0, 0, 10).empty());
}

TEST_CASE("daemon output: a task line shows state, phase, progress, addresses and who is down") {
  json t = {{"id", 7},           {"name", "vm1.img"},   {"state", "running"},
            {"phase", "Sync"},   {"source", "10.0.0.1:10809"}, {"destination", "10.0.0.2:10809"},
            {"blocks_total", 4}, {"blocks_left", 1},    {"note", ""},
            {"destination_down_since", 100.0}, {"source_down_since", 0.0}};
  std::string line = render_task_line(t, 142.0);
  CHECK(line.find("   7  running    Sync") == 0);
  CHECK(line.find("75%") != std::string::npos);
  CHECK(line.find("vm1.img  10.0.0.1:10809 -> 10.0.0.2:10809") != std::string::npos);
  CHECK(line.find("(destination down for 42 s)") != std::string::npos);
  t["state"] = "failed";
  t["destination_down_since"] = 0.0;
  t["error"] = "gave up after 5 attempts";
  CHECK(render_task_line(t, 142.0).find("(gave up after 5 attempts)") != std::string::npos);
}

namespace {

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> out;
  for (size_t at = 0; at < text.size();) {
    size_t nl = text.find('\n', at);
    out.push_back(text.substr(at, nl - at));
    at = nl + 1;
  }
  return out;
}

}  // namespace

TEST_CASE("daemon output: list with 30 tasks (issue #15) has a summary and the same columns on every line") {
  using livemig::mig::render_list;
  json tasks = json::array();
  for (int i = 1; i <= 30; ++i) {
    const std::string state = i <= 20 ? "running" : i <= 28 ? "queued" : i == 29 ? "done" : "failed";
    json t = {{"id", i},
              {"name", i == 3 ? "a-very-long-image-name-that-goes-on-and-on.img" : fmt::format("vm{}.img", i)},
              {"state", state},
              {"phase", state == "running" ? "PreCopy" : state == "done" ? "Done" : ""},
              {"source", fmt::format("10.0.{}.1:{}", i, 10809 + i)},
              {"destination", fmt::format("10.0.{}.2:10809", i * 7)},
              {"blocks_total", 100},
              {"blocks_left", state == "done" ? 0 : state == "queued" ? 100 : 100 - i},
              {"note", i == 21 ? "waiting for a free slot (20 of max-concurrent 20 running)" : ""}};
    if (state == "failed") t["error"] = "gave up after 5 attempts";
    tasks.push_back(t);
  }
  auto lines = lines_of(render_list(tasks, 100.0));
  REQUIRE(lines.size() == 32);  // summary, header, 30 tasks
  CHECK(lines[0] == "30 tasks: 20 running, 8 queued, 1 done, 1 failed; blocks moved [##------------------]  11%");
  // The NAME and FROM -> TO columns start at the same place on every line,
  // and the addresses' arrows line up.
  const size_t name_at = lines[1].find("NAME");
  const size_t route_at = lines[1].find("FROM -> TO");
  for (int i = 2; i < 32; ++i) {
    INFO(lines[i]);
    const std::string id = std::to_string(i - 1);
    CHECK(lines[i].substr(4 - id.size(), id.size()) == id);
    CHECK(lines[i][name_at - 1] == ' ');
    CHECK((lines[i][name_at] == 'v' || lines[i][name_at] == 'a'));
    CHECK(lines[i].substr(route_at, 5) == "10.0.");
  }
  // A long name is cut, not the columns after it.
  CHECK(lines[4].find("a-very-long-image-name-~") != std::string::npos);
  CHECK(lines[22].find("(waiting for a free slot") != std::string::npos);
  CHECK(lines[31].find("(gave up after 5 attempts)") != std::string::npos);
  // In an 80-column terminal no line wraps.
  for (const std::string& line : lines_of(render_list(tasks, 100.0, 80))) CHECK(line.size() <= 80);
}

TEST_CASE("daemon output: show says what the source's guest-first pacing does") {
  json reply = {{"task", {{"id", 3}, {"name", "vm3.img"}, {"state", "running"}, {"phase", "PreCopy"}}},
                {"time", 100.0}};
  CHECK(livemig::mig::render_show(reply).find("guest first") == std::string::npos);  // no status yet
  reply["source_status"] = {{"phase", "PreCopy"},
                            {"migration",
                             {{"pacing",
                               {{"active", true},
                                {"rate", 16.0 * 1024 * 1024},
                                {"window_p99_ms", 3.5},
                                {"guest_latency_bound", 1.2},
                                {"baseline_p99_ms", 2.0},
                                {"windows_over_bound", 4},
                                {"windows", 40}}}}}};
  const std::string text = livemig::mig::render_show(reply);
  CHECK(text.find("task          3 (vm3.img)") != std::string::npos);
  CHECK(text.find("guest first   held to 16") != std::string::npos);
  CHECK(text.find("MiB/s: guest p99 3.50 ms, bound 1.2x its 2.00 ms before (4 of 40 windows over)\n") !=
        std::string::npos);
}
