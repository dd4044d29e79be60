// migrate-nbd's handover groups: several disks of one VM handed over at one
// switchover, all or none (docs/handover.md, "Groups").
//
//   migrate-nbd handover --disk src:10809,dst:10809 --disk src:10810,dst:10810 --secret /etc/livemig/psk
//
// Two-phase commit with presumed abort. Each disk's migration runs with
// handover=explicit. The orchestrator asks every source to prepare (the
// source fences and sends HANDOVER with PREPARE; its destination checks and
// syncs, and does not commit), all at once. When every source is prepared
// it records commit at the coordinator (the first disk's destination plugin:
// control op group-decide), otherwise abort; then it tells every source to
// follow the decision (group-resolve): commit -> the destinations commit
// (HANDOVER without PREPARE), abort -> every source back to Sync, writable.
// The sources ask the coordinator themselves too, so an orchestrator that
// dies after the prepare leaves them waiting at most --group-timeout
// seconds: then they record abort (unless commit was recorded first).
#pragma once

#include <chrono>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "client-tools/migrate_nbd_commands.h"
#include "common/status.h"

namespace livemig::client {
class ControlClient;
struct SecretChoice;
}  // namespace livemig::client

namespace livemig::mig {

// One disk of a group: its source's and its destination's peer ports.
struct GroupDisk {
  std::string from, to;
};
// "FROM,TO" (two HOST:PORT); the error names the bad text.
Result<GroupDisk> parse_group_disk(const std::string& text);
// Every --disk text, and --group-timeout, checked; a bad one is printed as
// a usage error (the exit status returned).
std::optional<int> parse_group_disks(const std::vector<std::string>& texts, double group_timeout,
                                     std::vector<GroupDisk>* out);
// A group id no earlier group used: "grp-<unix time in ns>-<pid>".
std::string new_group_id();

struct GroupHandoverOptions : CommonOptions {
  std::vector<std::string> disks;  // --disk FROM,TO, repeatable
  double group_timeout = 30;       // seconds a prepared source waits for the decision
};

// The group's outcome: decision "commit", "abort" or "unknown" (the
// coordinator could not be asked; the sources follow whatever it holds);
// per disk, what its source answered.
struct GroupOutcome {
  std::string group;
  std::string decision;
  bool all_done = false;  // commit, and every source is PostCopy or Done
  std::string error;      // why not, for people
  nlohmann::json disks = nlohmann::json::array();
};

// Runs a group handover over sources that each run a migration (handover
// explicit) to the matching destination. `clients[i]` talks to disks[i]'s
// source; `coordinator` to disks[0]'s destination. progress: one line for
// people per step.
GroupOutcome run_group(const std::vector<GroupDisk>& disks,
                       std::vector<std::unique_ptr<client::ControlClient>>& clients,
                       client::ControlClient& coordinator, double group_timeout,
                       std::chrono::milliseconds long_timeout,
                       const std::function<void(const std::string&)>& progress);

// Clients for each disk's source and for the coordinator (disks[0].to).
std::optional<int> open_group_clients(const CommonOptions& o, const std::vector<GroupDisk>& disks,
                                      std::vector<std::unique_ptr<client::ControlClient>>* sources,
                                      std::unique_ptr<client::ControlClient>* coordinator);

// migrate-nbd handover --disk FROM,TO [--disk ...].
int run_group_handover(const GroupHandoverOptions& o);

}  // namespace livemig::mig
