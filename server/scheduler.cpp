#include "server/scheduler.h"

#include <algorithm>
#include <limits>
#include <set>

#include <fmt/format.h>

namespace livemig::daemon {

namespace {

std::set<std::string> hosts_of(const TaskSlot& t) { return {t.source_host, t.destination_host}; }

// A task's part of its hosts' bandwidth when it starts with others.
uint64_t weight(const TaskSlot& t) { return static_cast<uint64_t>(std::clamp(t.priority, 0, kMaxPriority)) + 1; }

// What a pinned task holds of each of its hosts under limit L (no cap: all).
uint64_t held(const TaskSlot& t, uint64_t L) { return t.rate_cap == 0 ? L : std::min(t.rate_cap, L); }

bool active(const std::string& phase) {
  return phase == "Monitoring" || phase == "PreCopy" || phase == "Sync" || phase == "Handover" || phase == "PostCopy";
}

bool handed_over(const std::string& phase) { return phase == "Handover" || phase == "PostCopy" || phase == "Done"; }

}  // namespace

std::map<int64_t, uint64_t> share_bandwidth(const std::vector<TaskSlot>& tasks, uint64_t L) {
  std::map<int64_t, uint64_t> caps;
  if (L == 0) {
    for (const TaskSlot& t : tasks) caps[t.id] = t.max_rate;
    return caps;
  }
  // Progressive filling: every unfrozen task holds level x its weight; the
  // level rises until a host is full or a task reaches its own max_rate,
  // which freezes the tasks concerned at their part.
  struct Filling {
    const TaskSlot* task;
    std::set<std::string> hosts;
    double weight;
    bool frozen = false;
    double cap = 0;
  };
  std::vector<Filling> f;
  std::map<std::string, double> left;
  for (const TaskSlot& t : tasks)
    for (const std::string& h : hosts_of(t)) left[h] = double(L);
  // Pinned tasks are frozen from the start at their cap, and hold it.
  size_t unfrozen = tasks.size();
  for (const TaskSlot& t : tasks) {
    f.push_back({&t, hosts_of(t), double(weight(t))});
    if (!t.pinned) continue;
    f.back().frozen = true;
    --unfrozen;
    for (const std::string& h : hosts_of(t)) left[h] = std::max(0.0, left[h] - double(held(t, L)));
  }
  double level = 0;
  while (unfrozen > 0) {
    std::map<std::string, double> weights;
    for (const Filling& x : f)
      if (!x.frozen)
        for (const std::string& h : x.hosts) weights[h] += x.weight;
    double step = std::numeric_limits<double>::infinity();
    for (const auto& [h, w] : weights) step = std::min(step, left[h] / w);
    for (const Filling& x : f)
      if (!x.frozen && x.task->max_rate != 0) step = std::min(step, double(x.task->max_rate) / x.weight - level);
    step = std::max(step, 0.0);
    level += step;
    for (const auto& [h, w] : weights) left[h] -= step * w;
    const size_t before = unfrozen;
    for (Filling& x : f) {
      if (x.frozen) continue;
      bool full = x.task->max_rate != 0 && level * x.weight >= double(x.task->max_rate) * (1 - 1e-12);
      for (const std::string& h : x.hosts) full = full || left[h] <= double(L) * 1e-12;
      if (!full) continue;
      x.frozen = true;
      x.cap = level * x.weight;
      --unfrozen;
    }
    if (unfrozen == before) {  // a round always fills something, rounding aside: stop there
      for (Filling& x : f)
        if (!x.frozen) x.cap = level * x.weight;
      break;
    }
  }
  for (const Filling& x : f) {
    if (x.task->pinned) {
      caps[x.task->id] = x.task->rate_cap;
      continue;
    }
    uint64_t cap = std::max<uint64_t>(1, static_cast<uint64_t>(x.cap));
    if (x.task->max_rate != 0) cap = std::min(cap, x.task->max_rate);
    caps[x.task->id] = cap;
  }
  // Rounding must not take a host over its limit (pinned caps stay).
  std::map<std::string, uint64_t> used;
  for (const TaskSlot& t : tasks)
    for (const std::string& h : hosts_of(t)) used[h] += t.pinned ? held(t, L) : caps[t.id];
  for (const TaskSlot& t : tasks)
    for (const std::string& h : hosts_of(t))
      while (!t.pinned && used[h] > L && caps[t.id] > 1) {
        --caps[t.id];
        for (const std::string& g : hosts_of(t)) --used[g];
      }
  return caps;
}

StartPlan plan_starts(const std::vector<TaskSlot>& running, const std::vector<TaskSlot>& fifo,
                      const SchedulerLimits& limits) {
  // Higher priority first; FIFO within a priority.
  std::vector<TaskSlot> queued = fifo;
  std::stable_sort(queued.begin(), queued.end(),
                   [](const TaskSlot& a, const TaskSlot& b) { return weight(a) > weight(b); });
  StartPlan plan;
  const uint64_t L = limits.host_bandwidth;
  const unsigned m = std::max(1u, limits.max_concurrent);
  // On each host: the weights of the tasks that share it (running, not
  // pinned, or starting), and what the pinned ones hold of it.
  std::map<std::string, uint64_t> weights, pinned;
  for (const TaskSlot& r : running)
    for (const std::string& h : hosts_of(r)) {
      if (r.pinned) pinned[h] += held(r, L);
      else weights[h] += weight(r);
    }
  std::vector<TaskSlot> together = running;
  for (size_t i = 0; i < queued.size(); ++i) {
    const TaskSlot& q = queued[i];
    if (together.size() >= m) {
      plan.waiting = fmt::format("waiting for a free slot ({} of max-concurrent {} running)", together.size(), m);
      plan.waiting_id = q.id;
      break;
    }
    std::string short_host;
    if (L > 0) {
      const uint64_t free_slots = m - together.size();
      for (const std::string& h : hosts_of(q)) {
        // Those behind it on h that may start with it (at most the free slots).
        uint64_t w = weights[h] + weight(q), sharers = 1;
        for (size_t j = i + 1; j < queued.size() && sharers < free_slots; ++j)
          if (hosts_of(queued[j]).count(h)) {
            w += weight(queued[j]);
            ++sharers;
          }
        const uint64_t rest = L - std::min(L, pinned[h]);
        uint64_t share = static_cast<uint64_t>(static_cast<unsigned __int128>(rest) * weight(q) / w);
        if (share < std::max<uint64_t>(1, L / (4 * uint64_t{m}))) {
          short_host = h;
          break;
        }
      }
    }
    if (!short_host.empty()) {
      plan.waiting = fmt::format("waiting for bandwidth on host {} (its limit is shared by the migrations running there)",
                                 short_host);
      plan.waiting_id = q.id;
      break;
    }
    together.push_back(q);
    for (const std::string& h : hosts_of(q)) weights[h] += weight(q);
  }
  const std::map<int64_t, uint64_t> caps = share_bandwidth(together, L);
  for (size_t i = running.size(); i < together.size(); ++i) plan.start.push_back({together[i].id, caps.at(together[i].id)});
  if (L > 0)
    for (const TaskSlot& r : running)
      if (!r.pinned && caps.at(r.id) != r.rate_cap) plan.rerate.push_back({r.id, caps.at(r.id)});
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
