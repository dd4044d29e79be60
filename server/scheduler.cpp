#include "server/scheduler.h"

#include <algorithm>
#include <set>

#include <fmt/format.h>

namespace livemig::daemon {

namespace {

std::set<std::string> hosts_of(const TaskSlot& t) { return {t.source_host, t.destination_host}; }

// A task's part of its hosts' bandwidth when it starts with others.
uint64_t weight(const TaskSlot& t) { return static_cast<uint64_t>(std::clamp(t.priority, 0, kMaxPriority)) + 1; }

bool active(const std::string& phase) {
  return phase == "Monitoring" || phase == "PreCopy" || phase == "Sync" || phase == "Handover" || phase == "PostCopy";
}

bool handed_over(const std::string& phase) { return phase == "Handover" || phase == "PostCopy" || phase == "Done"; }

}  // namespace

StartPlan plan_starts(const std::vector<TaskSlot>& running, const std::vector<TaskSlot>& fifo,
                      const SchedulerLimits& limits) {
  // Higher priority first; FIFO within a priority.
  std::vector<TaskSlot> queued = fifo;
  std::stable_sort(queued.begin(), queued.end(),
                   [](const TaskSlot& a, const TaskSlot& b) { return weight(a) > weight(b); });
  StartPlan plan;
  const uint64_t L = limits.host_bandwidth;
  const unsigned m = std::max(1u, limits.max_concurrent);
  std::map<std::string, uint64_t> used;  // bytes/s granted per host
  for (const TaskSlot& r : running)
    for (const std::string& h : hosts_of(r)) used[h] += r.rate_cap == 0 ? L : r.rate_cap;  // uncapped: all of it
  size_t n = running.size();
  for (size_t i = 0; i < queued.size(); ++i) {
    const TaskSlot& q = queued[i];
    if (n >= m) {
      plan.waiting = fmt::format("waiting for a free slot ({} of max-concurrent {} running)", n, m);
      plan.waiting_id = q.id;
      break;
    }
    uint64_t cap = q.max_rate;
    std::string short_host;
    if (L > 0) {
      const uint64_t free_slots = m - n;
      for (const std::string& h : hosts_of(q)) {
        // The weights of this task and of those behind it on h that may
        // start with it (at most the free slots).
        uint64_t weights = weight(q), sharers = 1;
        for (size_t j = i + 1; j < queued.size() && sharers < free_slots; ++j)
          if (hosts_of(queued[j]).count(h)) {
            weights += weight(queued[j]);
            ++sharers;
          }
        uint64_t left = used[h] >= L ? 0 : L - used[h];
        uint64_t share = static_cast<uint64_t>(static_cast<unsigned __int128>(left) * weight(q) / weights);
        if (share < std::max<uint64_t>(1, L / (4 * uint64_t{m}))) {
          short_host = h;
          break;
        }
        cap = cap == 0 ? share : std::min(cap, share);
      }
    }
    if (!short_host.empty()) {
      plan.waiting = fmt::format("waiting for bandwidth on host {} (its limit is taken by running migrations)",
                                 short_host);
      plan.waiting_id = q.id;
      break;
    }
    plan.start.push_back({q.id, cap});
    ++n;
    if (L > 0)
      for (const std::string& h : hosts_of(q)) used[h] += cap;
  }
  return plan;
}

Verdict judge(const TaskView& task, const PluginView& src, const PluginView& dst) {
  const std::string& id = task.migration_id;
  const bool src_ours = src.up && !id.empty() && src.migration_id == id;
  const bool dst_ours = dst.up && !id.empty() && dst.migration_id == id;
  if (src_ours && src.phase == "Done") return {Action::Done, ""};
  if (dst_ours && dst.phase == "Done" && dst.role == "destination") return {Action::Done, ""};
  // A source fenced for our migration handed over, even if it failed since.
  const bool src_handed_over = src_ours && (handed_over(src.phase) || (src.fenced && src.role == "source"));
  if (src_handed_over || (dst_ours && handed_over(dst.phase) && dst.role == "destination")) {
    Verdict v{Action::Wait, ""};
    if (src_ours && src.phase == "Handover" && !src.needs_resolution.empty())
      v.note = fmt::format("NEEDS RESOLUTION: {}; the source stays fenced until the destination answers, or run: {}",
                           src.needs_resolution, src.resolution_command);
    else if (!dst.up)
      v.note = "after handover: destination down; it resumes pulling when it is back";
    else if (!src.up)
      v.note = "after handover: source down; the destination pulls again when it is back";
    if (task.cancel_requested) v.note += std::string(v.note.empty() ? "" : "; ") + "too late to cancel: handed over";
    return v;
  }
  if (!src.up) return {Action::Wait, "source down: waiting for it to answer"};
  if (id.empty()) {
    // migrate was being issued when the daemon stopped, or not yet.
    if (active(src.phase) && src.role == "source" && src.peer == task.destination)
      return {Action::Adopt, "", src.migration_id};
    if (task.cancel_requested) return {Action::Cancelled, ""};
    if (active(src.phase))
      return {Action::Wait, fmt::format("the source is busy with migration {} to {}", src.migration_id, src.peer)};
    if (!dst.up) return {Action::Wait, "destination down: waiting for it to answer"};
    return {Action::Start, ""};
  }
  if (src_ours && active(src.phase)) {
    if (task.cancel_requested) return {Action::Cancel, ""};
    if (!dst.up) return {Action::Wait, "destination down: the source resumes the migration when it is back"};
    return {Action::Wait, ""};
  }
  if (src_ours && src.phase == "Cancelled") return {Action::Cancelled, ""};
  if (task.cancel_requested) return {Action::Cancelled, ""};
  // Before handover, the source failed our migration or forgot it.
  if (active(src.phase))
    return {Action::Failed, fmt::format("the source runs another migration ({} to {})", src.migration_id, src.peer)};
  if (src.fenced && src.role != "destination")
    return {Action::Failed, "the source is fenced (it handed its image over in another migration)"};
  if (!dst.up) return {Action::Wait, "destination down: restarting from pre-copy when it is back"};
  if (dst_ours && active(dst.phase))
    return {Action::Wait, "waiting for the destination to notice that the source stopped"};
  if (active(dst.phase))
    return {Action::Failed,
            fmt::format("the destination is busy with another migration ({} from {})", dst.migration_id, dst.peer)};
  std::string why = src_ours && !src.last_error.empty() ? src.last_error
                    : dst_ours && !dst.last_error.empty() ? dst.last_error
                                                          : "the source no longer runs it";
  return {Action::Start, "restarting from pre-copy: " + why};
}

}  // namespace livemig::daemon
