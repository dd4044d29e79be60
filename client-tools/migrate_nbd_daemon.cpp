#include "client-tools/migrate_nbd_daemon.h"

#include <sys/ioctl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <optional>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <thread>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "client-tools/interrupt_scope.h"
#include "client-tools/migrate_nbd_options.h"
#include "client-tools/migrate_nbd_output.h"
#include "client/control_client.h"
#include "client/units.h"

namespace livemig::mig {

using client::ControlClient;
using client::Target;
using client::Timeouts;
using client::format_rate;
using client::format_seconds;

using nlohmann::json;
using std::chrono::milliseconds;

namespace {

constexpr const char* kDefaultSocket = "/run/livemig/livemigd.sock";
constexpr const char* kDaemonFooter =
    "The daemon's socket is --daemon PATH, else $LIVEMIGD_SOCKET, else /run/livemig/livemigd.sock.\n"
    "Exit status: 0 success, 1 refused or failed (or, with --wait, the task did not end done),\n"
    "2 bad command line, 130 interrupted.";

std::string socket_of(const DaemonCommands& d) {
  if (!d.daemon.empty()) return d.daemon;
  if (const char* env = std::getenv("LIVEMIGD_SOCKET"); env && *env) return env;
  return kDefaultSocket;
}

// One request to livemigd; an "ok": false reply becomes its error alone.
Result<json> ask(const DaemonCommands& d, const json& request) {
  Timeouts t;
  if (d.timeout > 0) t.connect = t.reply = milliseconds(static_cast<int64_t>(d.timeout * 1000));
  else t.reply = milliseconds(120'000);  // submit checks both plugins; cancel waits for the source
  ControlClient client(Target::local(socket_of(d)), nullptr, t);
  auto reply = client.call_raw(request);
  if (!reply) {
    return Status::error(fmt::format("{} (is livemigd running? see --daemon or $LIVEMIGD_SOCKET)",
                                     reply.status().message()),
                         reply.status().errno_value());
  }
  if (reply->value("ok", false) != true)
    return Status::error(reply->value("error", std::string("livemigd refused the request without saying why")), EIO);
  return reply;
}

std::string clock_of(double unix_time) {
  if (unix_time <= 0) return "-";
  std::time_t t = static_cast<std::time_t>(unix_time);
  std::tm tm{};
  localtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%H:%M:%S", &tm);
  return buf;
}

bool final_state(const std::string& s) { return s == "done" || s == "failed" || s == "cancelled"; }

std::string render_task(const json& t, double now) {
  std::string out;
  auto line = [&](const char* key, const std::string& value) {
    if (!value.empty()) out += fmt::format("{:<13} {}\n", key, value);
  };
  line("task", fmt::format("{} ({})", t.value("id", int64_t{0}), t.value("name", "")));
  line("state", t.value("state", ""));
  line("phase", t.value("phase", ""));
  line("migration", t.value("migration_id", ""));
  line("mode", t.value("mode", ""));
  line("from", t.value("source", ""));
  line("to", t.value("destination", ""));
  uint64_t total = t.value("blocks_total", uint64_t{0});
  if (total) line("progress", progress_bar(total, t.value("blocks_left", uint64_t{0}), 30));
  uint64_t cap = t.value("rate_cap", uint64_t{0});
  line("rate cap", cap ? format_rate(static_cast<double>(cap)) : "none");
  if (int p = t.value("priority", 0)) line("priority", std::to_string(p));
  line("attempts", std::to_string(t.value("attempts", 0)));
  line("submitted", clock_of(t.value("submitted_at", 0.0)));
  line("started", clock_of(t.value("started_at", 0.0)));
  line("finished", clock_of(t.value("finished_at", 0.0)));
  double sd = t.value("source_down_since", 0.0), dd = t.value("destination_down_since", 0.0);
  if (sd > 0) line("source down", fmt::format("since {} ({})", clock_of(sd), format_seconds(now - sd)));
  if (dd > 0) line("dest down", fmt::format("since {} ({})", clock_of(dd), format_seconds(now - dd)));
  line("note", t.value("note", ""));
  line("error", t.value("error", ""));
  return out;
}

int cmd_submit(const DaemonCommands& d) {
  if (d.submit.from.empty()) {
    print_error("--from HOST:PORT (the source plugin's peer port) is required");
    return kExitUsage;
  }
  auto req = migrate_request(d.submit);
  if (!req) {
    print_error(req.status().message());
    return kExitUsage;
  }
  json submit = {{"op", "submit"}, {"request", *req}};
  if (!d.name.empty()) submit["name"] = d.name;
  if (d.priority) submit["priority"] = d.priority;
  auto reply = ask(d, submit);
  if (!reply) {
    print_error(reply.status().message());
    return kExitFailure;
  }
  const json task = reply->value("task", json::object());
  const int64_t id = task.value("id", int64_t{0});
  if (d.json && !d.submit.wait) print_json(*reply);
  if (!d.json)
    std::printf("task %lld queued: %s of %s from %s to %s\n", static_cast<long long>(id),
                task.value("mode", "").c_str(), task.value("name", "").c_str(), task.value("source", "").c_str(),
                task.value("destination", "").c_str());
  if (!d.submit.wait) return kExitOk;
  std::fflush(stdout);
  std::string last;
  for (;;) {
    auto shown = ask(d, {{"op", "show"}, {"id", id}});
    if (!shown) {
      print_error(shown.status().message());
      return kExitFailure;
    }
    const json t = shown->value("task", json::object());
    std::string state = t.value("state", "");
    if (!d.json) {
      std::string now = render_task_line(t, shown->value("time", 0.0));
      if (now != last) std::printf("%s %s\n", clock_of(shown->value("time", 0.0)).c_str(), now.c_str());
      last = now;
      std::fflush(stdout);
    }
    if (final_state(state)) {
      if (d.json) print_json(t);
      else if (state != "done") std::printf("task %lld %s: %s\n", static_cast<long long>(id), state.c_str(),
                                            t.value("error", "").c_str());
      return state == "done" ? kExitOk : kExitFailure;
    }
    std::this_thread::sleep_for(milliseconds(static_cast<int64_t>(d.submit.interval * 1000)));
  }
}

int cmd_list(const DaemonCommands& d) {
  if (d.interval <= 0) {
    print_error("--interval must be more than 0 seconds");
    return kExitUsage;
  }
  const bool tty = ::isatty(STDOUT_FILENO);
  std::optional<InterruptScope> interrupt;  // Ctrl-C ends the watch
  if (d.watch) interrupt.emplace();
  for (;;) {
    auto reply = ask(d, {{"op", "list"}, {"active", d.watch && !d.all}});
    if (!reply) {
      print_error(reply.status().message());
      return kExitFailure;
    }
    const json tasks = reply->value("tasks", json::array());
    const double now = reply->value("time", 0.0);
    if (!d.watch) {
      if (d.json) print_json(tasks);
      else std::fputs(render_list(tasks, now).c_str(), stdout);
      return kExitOk;
    }
    if (d.json) {
      print_json({{"time", now}, {"tasks", tasks}});
    } else if (tty) {
      std::printf("\033[H\033[J%s", fmt::format("migrate-nbd list --watch   {}   every {:g} s   Ctrl-C to quit\n\n",
                                               clock_of(now), d.interval).c_str());
      winsize ws{};
      const size_t columns = ::ioctl(STDOUT_FILENO, TIOCGWINSZ, &ws) == 0 ? ws.ws_col : 0;
      std::fputs(render_list(tasks, now, columns).c_str(), stdout);
    } else {
      for (const json& t : tasks) std::printf("%s %s\n", clock_of(now).c_str(), render_task_line(t, now).c_str());
    }
    std::fflush(stdout);
    bool active = false;
    for (const json& t : tasks) active |= !final_state(t.value("state", ""));
    if (!active) return kExitOk;
    auto until = std::chrono::steady_clock::now() + milliseconds(static_cast<int64_t>(d.interval * 1000));
    while (std::chrono::steady_clock::now() < until && !InterruptScope::interrupted())
      std::this_thread::sleep_for(milliseconds(50));
    if (InterruptScope::interrupted()) return kExitInterrupted;
  }
}

int cmd_show(const DaemonCommands& d) {
  auto reply = ask(d, {{"op", "show"}, {"id", d.id}});
  if (!reply) {
    print_error(reply.status().message());
    return kExitFailure;
  }
  if (d.json) print_json(*reply);
  else std::fputs(render_show(*reply).c_str(), stdout);
  return kExitOk;
}

int cmd_cancel(const DaemonCommands& d) {
  auto reply = ask(d, {{"op", "cancel"}, {"id", d.id}});
  if (!reply) {
    print_error(reply.status().message());
    return kExitFailure;
  }
  if (d.json) print_json(*reply);
  else std::printf("task %lld cancelled\n", static_cast<long long>(d.id));
  return kExitOk;
}

void add_daemon_options(CLI::App* sub, DaemonCommands& d) {
  sub->add_option("--daemon", d.daemon, "livemigd's socket (default: $LIVEMIGD_SOCKET, else /run/livemig/livemigd.sock)")
      ->type_name("SOCKET");
  sub->add_option("--timeout", d.timeout, "give up on a reply after this long (default 120)")->type_name("SECONDS");
  sub->add_flag("--json", d.json, "print JSON for scripts instead of text for people");
  sub->footer(kDaemonFooter);
}

}  // namespace

std::string render_show(const json& reply) {
  std::string out = render_task(reply.value("task", json::object()), reply.value("time", 0.0));
  // What the source plugin last said of its guest-first pacing.
  const json& st = reply.value("source_status", json::object());
  if (st.contains("migration") && st["migration"].contains("pacing"))
    out += fmt::format("{:<13} {}\n", "guest first", pacing_text(st["migration"]));
  return out;
}

std::string progress_bar(uint64_t total, uint64_t left, int width) {
  if (total == 0) return "";
  double done = left >= total ? 0 : double(total - left) / double(total);
  int filled = static_cast<int>(done * width + 0.5);
  return fmt::format("[{}{}] {:3.0f}%", std::string(filled, '#'), std::string(width - filled, '-'), done * 100);
}

std::string render_task_line(const json& t, double now, const ListColumns& columns) {
  std::string progress;
  const std::string state = t.value("state", "");
  uint64_t total = t.value("blocks_total", uint64_t{0});
  if (total && state != "queued") progress = progress_bar(total, t.value("blocks_left", uint64_t{0}), 20);
  std::string note = t.value("note", "");
  if (note.empty() && state == "failed") note = t.value("error", "");
  double dd = t.value("destination_down_since", 0.0), sd = t.value("source_down_since", 0.0);
  if (dd > 0) note = fmt::format("destination down for {}{}", format_seconds(now - dd), note.empty() ? "" : "; " + note);
  if (sd > 0) note = fmt::format("source down for {}{}", format_seconds(now - sd), note.empty() ? "" : "; " + note);
  const std::string route = t.value("source", "") + " -> " + t.value("destination", "");
  return fmt::format("{:>4}  {:<9}  {:<9}  {:<27}  {:<{}}  {:<{}}{}", t.value("id", int64_t{0}), state,
                     t.value("phase", "").empty() ? "-" : t.value("phase", ""), progress.empty() ? "-" : progress,
                     t.value("name", ""), columns.name, route, note.empty() ? 0 : columns.route,
                     note.empty() ? "" : "  (" + note + ")");
}

std::string render_list(const json& tasks, double now, size_t width) {
  // Names beyond this are cut on the screen; the address pair never is.
  constexpr size_t kMaxName = 24;
  ListColumns columns{4, 0};
  std::map<std::string, int> states;
  uint64_t total = 0, left = 0;
  for (const json& t : tasks) {
    columns.name = std::max(columns.name, std::min(kMaxName, t.value("name", "").size()));
    columns.route = std::max(columns.route, t.value("source", "").size() + 4 + t.value("destination", "").size());
    ++states[t.value("state", "")];
    total += t.value("blocks_total", uint64_t{0});
    left += std::min(t.value("blocks_left", uint64_t{0}), t.value("blocks_total", uint64_t{0}));
  }
  std::string summary = fmt::format("{} task{}:", tasks.size(), tasks.size() == 1 ? "" : "s");
  const char* sep = " ";
  for (const char* s : {"running", "queued", "done", "failed", "cancelled"}) {
    if (!states.count(s)) continue;
    summary += fmt::format("{}{} {}", sep, states[s], s);
    sep = ", ";
  }
  if (total) summary += fmt::format("; blocks moved {}", progress_bar(total, left, 20));
  std::string out = summary + "\n";
  out += fmt::format("{:>4}  {:<9}  {:<9}  {:<27}  {:<{}}  {}\n", "ID", "STATE", "PHASE", "PROGRESS", "NAME",
                     columns.name, "FROM -> TO  (NOTE)");
  for (const json& t : tasks) {
    json shown = t;
    std::string name = t.value("name", "");
    if (name.size() > kMaxName) shown["name"] = name.substr(0, kMaxName - 1) + "~";
    out += render_task_line(shown, now, columns) + "\n";
  }
  if (width == 0) return out;
  std::string cut;  // every line at most `width` characters
  for (size_t at = 0; at < out.size();) {
    size_t nl = out.find('\n', at);
    std::string line = out.substr(at, nl - at);
    if (line.size() > width) line = line.substr(0, width > 1 ? width - 1 : 0) + (width > 1 ? "~" : "");
    cut += line + "\n";
    at = nl + 1;
  }
  return cut;
}

void add_daemon_commands(CLI::App& app, DaemonCommands& d, std::map<std::string, std::string>& examples) {
  examples["submit"] =
      "migrate-nbd submit --daemon /run/livemig/livemigd.sock --from src:10809 --to dst:10809 --mode precopy "
      "--handover auto";
  examples["list"] = "migrate-nbd list --watch";
  examples["show"] = "migrate-nbd show 3";

  d.submit_cmd = app.add_subcommand("submit", "Queues a migration at livemigd, which runs it when its turn comes.");
  add_daemon_options(d.submit_cmd, d);
  d.submit_cmd->add_option("--from", d.submit.from, "the source plugin's peer port (the export)")
      ->required()
      ->type_name("HOST:PORT");
  d.submit_cmd->add_option("--to", d.submit.to, "the destination plugin's peer port")->required()->type_name("HOST:PORT");
  d.submit_cmd->add_option("--name", d.name, "a name for people (default: the source image's file name)")
      ->type_name("NAME");
  d.submit_cmd
      ->add_option("--priority", d.priority,
                   "0 normal (default) .. 9 most urgent: a queued task of a higher priority starts first, and "
                   "under livemigd's host-bandwidth limit a running task gets priority + 1 shares "
                   "of its hosts' bandwidth")
      ->type_name("N")
      ->check(CLI::Range(0, 9));
  add_migration_options(d.submit_cmd, d.submit);
  d.submit_cmd->add_flag("--wait", d.submit.wait, "show the task's progress until it ends; exit 0 only if done");
  d.submit_cmd->add_option("--interval", d.submit.interval, "seconds between updates with --wait (default 1)")
      ->type_name("SECONDS");

  d.list_cmd = app.add_subcommand("list", "Lists livemigd's tasks: queued, running and ended, with progress.");
  add_daemon_options(d.list_cmd, d);
  d.list_cmd->add_flag("--all", d.all, "with --watch, also the tasks that ended (without --watch they are listed)");
  d.list_cmd->add_flag("--watch", d.watch, "redraw every --interval until no task is queued or running");
  d.list_cmd->add_option("--interval", d.interval, "seconds between updates with --watch (default 1)")
      ->type_name("SECONDS");

  d.show_cmd = app.add_subcommand("show", "Shows one livemigd task in detail, with what both plugins last said.");
  add_daemon_options(d.show_cmd, d);
  d.show_cmd->add_option("id", d.id, "the task id (from submit or list)")->required()->type_name("ID");

  // `cancel ID` cancels a task; `cancel --from HOST:PORT` (migrate-nbd's own)
  // stays as it is, so the daemon's form is added to that subcommand.
  d.cancel_cmd = app.get_subcommand("cancel");
  d.cancel_cmd->description(d.cancel_cmd->get_description() +
                            " With a task ID, cancels that livemigd task instead: a queued one, or a running one "
                            "before handover.");
  d.cancel_cmd->add_option("task", d.id, "a livemigd task id (from submit or list)")->type_name("ID");
  d.cancel_cmd->add_option("--daemon", d.daemon,
                           "with ID: livemigd's socket (default: $LIVEMIGD_SOCKET, else /run/livemig/livemigd.sock)")
      ->type_name("SOCKET");
  examples["cancel"] = "migrate-nbd cancel --from src:10809    or, for a livemigd task:  migrate-nbd cancel 3";
}

std::optional<int> run_daemon_command(const DaemonCommands& d) {
  if (d.submit_cmd && d.submit_cmd->parsed()) return cmd_submit(d);
  if (d.list_cmd && d.list_cmd->parsed()) return cmd_list(d);
  if (d.show_cmd && d.show_cmd->parsed()) return cmd_show(d);
  if (d.cancel_cmd && d.cancel_cmd->parsed() && d.cancel_cmd->count("task")) {
    DaemonCommands c = d;  // the subcommand's own --json and --timeout
    c.json = d.cancel_cmd->get_option("--json")->as<bool>();
    c.timeout = d.cancel_cmd->get_option("--timeout")->as<double>();
    return cmd_cancel(c);
  }
  return std::nullopt;
}

}  // namespace livemig::mig
