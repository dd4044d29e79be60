// The migrate-nbd subcommands that talk to livemigd, the migrations daemon
// (server/daemon.h), over its Unix socket (JSON lines):
//   submit   queue a migration (the options of `start`); --wait for its end
//   list     the tasks (--watch: redraw with progress bars until none runs)
//   show     one task, with what both plugins last said
//   cancel ID  cancel a queued task, or a running one before handover
//            (`cancel --from HOST:PORT` still cancels at a plugin)
// The socket is --daemon PATH, else $LIVEMIGD_SOCKET, else
// /run/livemig/livemigd.sock. Exit status as the other subcommands
// (migrate_nbd_commands.h): 0 ok, 1 refused or failed, 2 bad command line.
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>

#include <CLI/CLI.hpp>

#include "client-tools/migrate_nbd_commands.h"

namespace livemig::mig {

struct DaemonCommands {
  std::string daemon;  // the socket
  bool json = false;
  double timeout = 0;
  StartOptions submit;
  std::string name;
  int priority = 0;    // submit: 0 normal .. 9 most urgent
  bool all = false;    // list: also the ended tasks
  bool watch = false;  // list: redraw until no task is queued or running
  double interval = 1;
  int64_t id = 0;      // show, cancel
  CLI::App* submit_cmd = nullptr;
  CLI::App* list_cmd = nullptr;
  CLI::App* show_cmd = nullptr;
  CLI::App* cancel_cmd = nullptr;
};

// Adds submit, list and show to `app`, the task form to its existing
// `cancel`, and their example lines to `examples` (help starts with them).
// REQUIRES: `cancel` was added to `app` already.
void add_daemon_commands(CLI::App& app, DaemonCommands& d, std::map<std::string, std::string>& examples);

// Runs the one that was parsed; nullopt if none of them was.
std::optional<int> run_daemon_command(const DaemonCommands& d);

// Widths of list's NAME and FROM -> TO columns, the same on every line
// (0: as wide as the value).
struct ListColumns {
  size_t name = 0;
  size_t route = 0;
};

// Text for people: one task's line in `list` (without '\n'), and a progress
// bar "[#####-----]  50%" of `width` characters between the brackets.
std::string render_task_line(const nlohmann::json& task, double now, const ListColumns& columns = {});
std::string progress_bar(uint64_t total, uint64_t left, int width);

// The show screen: the task, and what the source plugin's last status says
// of its guest-first pacing (reply: livemigd's answer to show).
std::string render_show(const nlohmann::json& reply);

// The list screen: a summary line (tasks per state, the blocks moved of all
// of them), a header, and a line per task with its columns aligned. With
// `width` > 0 (a terminal's columns) no line is longer.
std::string render_list(const nlohmann::json& tasks, double now, size_t width = 0);

}  // namespace livemig::mig
