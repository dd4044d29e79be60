#include "client-tools/migrate_nbd_group.h"

#include <unistd.h>

#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include <fmt/format.h>

#include "client/control_client.h"

namespace livemig::mig {

using client::ControlClient;
using nlohmann::json;
using std::chrono::milliseconds;

namespace {

// LIVEMIG_TEST_CRASH_AT names this point: the orchestrator kills itself
// (SIGKILL) there, as the plugins do at theirs (plugin/test_hooks.h).
void crash_point(const char* name) {
  const char* points = std::getenv("LIVEMIG_TEST_CRASH_AT");
  if (!points) return;
  std::string all = std::string(",") + points + ",";
  if (all.find(std::string(",") + name + ",") == std::string::npos) return;
  std::fprintf(stderr, "migrate-nbd: test crash point %s\n", name);
  ::kill(::getpid(), SIGKILL);
}

// Runs f(i) for every i in [0, n) at once, each on its own thread.
template <typename F>
void each_at_once(size_t n, F f) {
  std::vector<std::thread> threads;
  threads.reserve(n);
  for (size_t i = 0; i < n; ++i) threads.emplace_back([&f, i] { f(i); });
  for (auto& t : threads) t.join();
}

}  // namespace

Result<GroupDisk> parse_group_disk(const std::string& text) {
  size_t comma = text.find(',');
  if (comma == std::string::npos || text.find(',', comma + 1) != std::string::npos)
    return Status::error(fmt::format("--disk {}: expected FROM,TO (the source's and the destination's HOST:PORT)",
                                     text));
  GroupDisk d{text.substr(0, comma), text.substr(comma + 1)};
  for (const std::string* side : {&d.from, &d.to})
    if (auto hp = parse_host_port(*side); !hp)
      return Status::error(fmt::format("--disk {}: {}", text, hp.status().message()));
  return d;
}

std::optional<int> parse_group_disks(const std::vector<std::string>& texts, double group_timeout,
                                     std::vector<GroupDisk>* out) {
  if (!(group_timeout >= 0.1 && group_timeout <= 86400)) {
    print_error("--group-timeout must be 0.1 to 86400 seconds");
    return kExitUsage;
  }
  for (const std::string& text : texts) {
    auto d = parse_group_disk(text);
    if (!d) {
      print_error(d.status().message());
      return kExitUsage;
    }
    out->push_back(*d);
  }
  return std::nullopt;
}

std::string new_group_id() {
  auto ns = std::chrono::duration_cast<std::chrono::nanoseconds>(
                std::chrono::system_clock::now().time_since_epoch())
                .count();
  return fmt::format("grp-{}-{}", ns, ::getpid());
}

GroupOutcome run_group(const std::vector<GroupDisk>& disks, std::vector<std::unique_ptr<ControlClient>>& clients,
                       ControlClient& coordinator, double group_timeout, milliseconds long_timeout,
                       const std::function<void(const std::string&)>& progress) {
  GroupOutcome out;
  out.group = new_group_id();
  const size_t n = disks.size();
  const std::string& coordinator_address = disks[0].to;
  progress(fmt::format("group {}: preparing {} disk(s); the coordinator is {}", out.group, n, coordinator_address));

  // 1. Prepare, every disk at once: each source fences and sends
  // HANDOVER(PREPARE); the reply comes once its destination is prepared.
  std::vector<Result<json>> prepared(n, Status::error("not asked"));
  each_at_once(n, [&](size_t i) {
    prepared[i] = clients[i]->call({{"op", "handover"},
                                    {"group", out.group},
                                    {"coordinator", coordinator_address},
                                    {"group_timeout", group_timeout}},
                                   long_timeout);
  });
  bool all_prepared = true;
  for (size_t i = 0; i < n; ++i) {
    json d = {{"from", disks[i].from}, {"to", disks[i].to}};
    if (prepared[i] && prepared[i]->value("prepared", false)) {
      d["prepared"] = true;
      d["generation"] = prepared[i]->value("generation", uint64_t{0});
      progress(fmt::format("disk {} ({} -> {}): prepared", i + 1, disks[i].from, disks[i].to));
    } else {
      all_prepared = false;
      d["prepared"] = false;
      d["error"] = prepared[i] ? fmt::format("unexpected answer {}", prepared[i]->dump()) : prepared[i].status().message();
      progress(fmt::format("disk {} ({} -> {}): not prepared: {}", i + 1, disks[i].from, disks[i].to,
                           d["error"].get<std::string>()));
    }
    out.disks.push_back(std::move(d));
  }
  crash_point("orchestrator-after-prepare");

  // 2. The decision, recorded at the coordinator: this is the group's
  // outcome for good (a source that gave up waiting may have recorded
  // abort first; the first decision wins).
  const std::string want = all_prepared ? "commit" : "abort";
  auto decided = coordinator.call_raw({{"op", "group-decide"}, {"group", out.group}, {"decision", want}});
  if (!decided || !decided->contains("decision") || !(*decided)["decision"].is_string()) {
    out.decision = "unknown";
    out.error = fmt::format("recording {} at the coordinator {}: {}; the sources follow whatever it recorded (abort "
                            "after {:g} s undecided)",
                            want, coordinator_address,
                            decided ? decided->value("error", decided->dump()) : decided.status().message(),
                            group_timeout);
    progress(out.error);
    return out;
  }
  out.decision = (*decided)["decision"].get<std::string>();
  progress(fmt::format("group {}: {} recorded at {}{}", out.group, out.decision, coordinator_address,
                       out.decision == want ? "" : fmt::format(" (wanted {}: a source decided first)", want)));
  crash_point("orchestrator-after-decision");

  // 3. Every source follows the decision (it asks the coordinator itself).
  std::vector<Result<json>> followed(n, Status::error("not asked"));
  each_at_once(n, [&](size_t i) { followed[i] = clients[i]->call({{"op", "group-resolve"}}, long_timeout); });
  bool all_done = out.decision == "commit";
  for (size_t i = 0; i < n; ++i) {
    json& d = out.disks[i];
    if (followed[i]) {
      std::string phase = followed[i]->value("phase", std::string("?"));
      d["phase"] = phase;
      d["outcome"] = followed[i]->value("outcome", std::string());
      if (phase != "PostCopy" && phase != "Done") all_done = false;
      progress(fmt::format("disk {} ({} -> {}): {}{}", i + 1, disks[i].from, disks[i].to, phase,
                           d["outcome"].get<std::string>().empty() ? "" : ": " + d["outcome"].get<std::string>()));
    } else {
      all_done = false;
      d["phase"] = "?";
      d["resolve_error"] = followed[i].status().message();
      progress(fmt::format("disk {} ({} -> {}): {}", i + 1, disks[i].from, disks[i].to,
                           followed[i].status().message()));
    }
  }
  out.all_done = all_done;
  if (out.decision == "abort")
    out.error = fmt::format("group {} aborted: no disk was handed over; every source serves its image", out.group);
  else if (!all_done)
    out.error = fmt::format("group {} committed, but not every source has followed yet (see above); they keep asking",
                            out.group);
  return out;
}

std::optional<int> open_group_clients(const CommonOptions& o, const std::vector<GroupDisk>& disks,
                                      std::vector<std::unique_ptr<ControlClient>>* sources,
                                      std::unique_ptr<ControlClient>* coordinator) {
  std::string warning;
  auto secret = client::choose_secret(o.secret_file, o.tls, &warning);
  if (!secret) {
    print_error(secret.status().message());
    return kExitFailure;
  }
  if (!warning.empty()) print_error("warning: " + warning);
  auto shared = std::make_shared<const client::SecretChoice>(std::move(*secret));
  client::Timeouts t;
  if (o.timeout > 0) t.connect = t.reply = milliseconds(static_cast<int64_t>(o.timeout * 1000));
  auto make = [&](const std::string& address) {
    return std::make_unique<ControlClient>(client::Target::remote(*parse_host_port(address)), shared, t);
  };
  for (const GroupDisk& d : disks) sources->push_back(make(d.from));
  *coordinator = make(disks[0].to);
  return std::nullopt;
}

int run_group_handover(const GroupHandoverOptions& o) {
  if (!o.from.empty() || !o.socket.empty()) {
    print_error("give --disk FROM,TO for each disk of the group, or --from for one disk, not both");
    return kExitUsage;
  }
  std::vector<GroupDisk> disks;
  if (auto rc = parse_group_disks(o.disks, o.group_timeout, &disks)) return *rc;
  std::vector<std::unique_ptr<ControlClient>> sources;
  std::unique_ptr<ControlClient> coordinator;
  if (auto rc = open_group_clients(o, disks, &sources, &coordinator)) return *rc;
  const milliseconds long_timeout = o.timeout > 0 ? milliseconds(static_cast<int64_t>(o.timeout * 1000))
                                                  : milliseconds(300'000);
  GroupOutcome g = run_group(disks, sources, *coordinator, o.group_timeout, long_timeout,
                             [&](const std::string& line) {
                               if (!o.json) std::printf("%s\n", line.c_str());
                               std::fflush(stdout);
                             });
  if (o.json) {
    json j = {{"ok", g.all_done}, {"group", g.group}, {"decision", g.decision}, {"disks", g.disks}};
    if (!g.error.empty()) j["error"] = g.error;
    std::printf("%s\n", j.dump().c_str());
  } else if (g.all_done) {
    std::printf("group handover done: %zu disk(s); every destination is authoritative\n", disks.size());
  }
  if (!g.all_done && !o.json) print_error(g.error);
  return g.all_done ? kExitOk : kExitFailure;
}

}  // namespace livemig::mig
