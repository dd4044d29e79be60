#include "client-tools/migrate_nbd_daemon.h"

#include <catch2/catch.hpp>

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
