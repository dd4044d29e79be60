#include "server/daemon.h"

#include <netdb.h>
#include <sys/socket.h>

#include <cstdio>
#include <ctime>
#include <set>
#include <stdexcept>

#include <fmt/format.h>

#include "common/migration_params.h"
#include "common/json_limits.h"
#include "common/peer_link.h"

namespace livemig::daemon {

using nlohmann::json;
using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

namespace {

constexpr milliseconds kTick{200};
// Replies of migrate and cancel, which block in the plugin.
constexpr milliseconds kLongReply{120'000};
// Submit checks both plugins; an answer must come within this.
constexpr milliseconds kSubmitTimeout{5'000};
// A cancel request waits this long for the task to end.
constexpr auto kCancelWait = std::chrono::seconds(60);

milliseconds to_ms(double seconds) { return milliseconds(static_cast<int64_t>(seconds * 1000)); }

json error_reply(const std::string& message) { return {{"ok", false}, {"error", message}}; }

// HOST:PORT with HOST resolved to a numeric address, so that one host has
// one name for the bandwidth limit and for the duplicate check.
Result<std::string> resolve(const std::string& what, const std::string& address) {
  auto hp = parse_host_port(address);
  if (!hp) return Status::error(fmt::format("{} {}", what, hp.status().message()));
  addrinfo hints{};
  hints.ai_family = AF_UNSPEC;
  hints.ai_socktype = SOCK_STREAM;
  addrinfo* res = nullptr;
  int rc = ::getaddrinfo(hp->host.c_str(), nullptr, &hints, &res);
  if (rc != 0 || !res)
    return Status::error(fmt::format("unknown host: {} {}: {} does not resolve ({})", what, address, hp->host,
                                     rc ? gai_strerror(rc) : "no address"),
                         EHOSTUNREACH);
  char host[NI_MAXHOST];
  rc = ::getnameinfo(res->ai_addr, res->ai_addrlen, host, sizeof host, nullptr, 0, NI_NUMERICHOST);
  ::freeaddrinfo(res);
  if (rc != 0) return Status::error(fmt::format("{} {}: {}", what, address, gai_strerror(rc)), EHOSTUNREACH);
  return HostPort{host, hp->port}.str();
}

bool is_protocol_errno(int e) {
  switch (e) {
    case EPROTO: case EILSEQ: case EPROTONOSUPPORT: case EBADRQC: case EMSGSIZE: case EBADMSG: case ENOMSG: case EACCES:
    case EKEYREJECTED:  // TLS refused or required: something answers, not as we can talk to
      return true;
    default:
      return false;
  }
}

bool handed_over_phase(const std::string& p) { return p == "Handover" || p == "PostCopy" || p == "Done"; }

// The plugin whose cap paces a running task's data: the source before
// handover (its pushes), the destination after (its pulls).
const std::string& rate_holder(const Task& t) {
  return t.phase == "PostCopy" || t.phase == "Done" ? t.destination : t.source;
}

PluginView view_from_status(const json& st) {
  PluginView v;
  v.up = true;
  v.phase = st.value("phase", "");
  v.role = st.value("role", "");
  v.fenced = st.value("fenced", false);
  v.last_error = st.value("last_error", "");
  if (auto m = st.find("migration"); m != st.end() && m->is_object()) {
    v.migration_id = m->value("id", "");
    v.peer = m->value("peer", "");
    if (v.last_error.empty()) v.last_error = m->value("last_error", "");
  }
  if (auto r = st.find("needs_resolution"); r != st.end() && r->is_object()) {
    v.needs_resolution = r->value("why", "");
    v.resolution_command = r->value("command", "");
  }
  return v;
}

}  // namespace

// ---------------------------------------------------------------- life cycle

Result<std::unique_ptr<Daemon>> Daemon::create(const DaemonConfig& config) {
  if (config.max_concurrent < 1) return Status::error("max-concurrent must be at least 1");
  if (!(config.heartbeat_interval > 0) || !(config.heartbeat_timeout > 0))
    return Status::error("heartbeat-interval and heartbeat-timeout must be more than 0 seconds");
  std::string warning;
  auto secret = client::choose_secret(config.secret_file, config.tls, &warning);
  if (!secret) return secret.status();
  if (!secret->present)
    return Status::error("livemigd needs the plugins' key: secret = FILE in the configuration, --secret FILE, or "
                         "LIVEMIG_SECRET_FILE (there is no built-in key)");
  auto store = TaskStore::open(config.database);
  if (!store) return store.status();
  std::unique_ptr<Daemon> d(new Daemon(config, std::move(*store),
                                       std::make_shared<const client::SecretChoice>(std::move(*secret))));
  if (!warning.empty()) d->log("warning: " + warning);
  Daemon* self = d.get();
  auto server = ControlServer::bind(
      config.socket, [self](std::string_view line) { return self->handle(line); }, "socket");
  if (!server) return server.status();
  d->server_ = std::move(*server);
  if (!config.metrics_listen.empty()) {
    auto metrics = MetricsExporter::start(config.metrics_listen, [self] { return self->metrics_snapshot(); });
    if (!metrics) return metrics.status();
    d->metrics_ = std::move(*metrics);
  }
  return d;
}

Daemon::Daemon(DaemonConfig config, std::unique_ptr<TaskStore> store,
               std::shared_ptr<const client::SecretChoice> secret)
    : config_(std::move(config)), store_(std::move(store)), secret_(std::move(secret)) {}

Daemon::~Daemon() { stop(); }

void Daemon::start() {
  auto running = store_->list(true);
  if (running) {
    size_t n = 0;
    for (const Task& t : *running) n += t.state == TaskState::Running;
    log(fmt::format("{} task(s) queued or running; {} running re-attach through their plugins' status", running->size(),
                    n));
  }
  heartbeats_ = std::make_unique<HeartbeatLoop>(secret_, to_ms(config_.heartbeat_interval),
                                                to_ms(config_.heartbeat_timeout), !config_.metrics_listen.empty());
  server_->start(nullptr, std::chrono::seconds(3600));
  scheduler_ = std::thread([this] { scheduler_loop(); });
}

void Daemon::stop() {
  if (stopping_.exchange(true)) return;
  metrics_.reset();  // no scrape runs from here on
  {
    std::lock_guard lock(wake_mu_);
  }
  wake_.notify_all();
  {
    MutexLock lock(mu_);  // a cancel request waiting for its task gives up
  }
  changed_.notify_all();
  if (scheduler_.joinable()) scheduler_.join();
  // No call starts now; one at a hung plugin ends within its timeouts.
  for (PluginCall& c : calls_) c.thread.join();
  calls_.clear();
  if (server_) server_->stop();
  heartbeats_.reset();
}

void Daemon::log(const std::string& message) {
  std::fprintf(stderr, "livemigd: %s\n", message.c_str());
  std::fflush(stderr);
}

template <typename Fn>
void Daemon::modify(int64_t id, Fn&& fn) {
  MutexLock lock(mu_);
  auto t = store_->get(id);
  if (!t || !*t) {
    if (!t) log(t.status().message());
    return;
  }
  Task task = std::move(**t);
  TaskState before = task.state;
  if (!fn(task)) return;
  if (Status s = store_->update(task); !s) {
    log(fmt::format("task {}: {}", id, s.message()));
    return;
  }
  if (task.state != before) {
    log(fmt::format("task {} ({}): {} -> {}{}", id, task.name, state_name(before), state_name(task.state),
                    task.error.empty() || task.state != TaskState::Failed ? "" : ": " + task.error));
    changed_.notify_all();
  }
}

// ---------------------------------------------------------------- scheduler

void Daemon::scheduler_loop() {
  while (!stopping_) {
    tick();
    std::unique_lock lock(wake_mu_);
    wake_.wait_for(lock, kTick, [&] { return stopping_.load(); });
  }
}

void Daemon::watch_addresses(const std::vector<Task>& running) {
  std::set<std::string> wanted;
  for (const Task& t : running) {
    wanted.insert(t.source);
    wanted.insert(t.destination);
  }
  heartbeats_->watch(wanted);
}

PluginView Daemon::view_of(const std::string& address, double* down_since, Clock::time_point* answered_at) {
  auto watched = heartbeats_->snapshot(address);
  if (!watched) return {};
  const HeartbeatLoop::Snapshot& s = *watched;
  *down_since = s.down ? s.down_since : 0;
  *answered_at = s.answered_at;
  if (s.down || !s.known) {
    PluginView v;
    v.up = false;
    v.last_error = s.error;
    if (!s.down) v.phase = "?";  // not answered yet, not down yet: unknown
    return v;
  }
  return view_from_status(s.status);
}

void Daemon::tick() {
  auto running = store_->list(true);
  if (!running) {
    log(running.status().message());
    return;
  }
  std::vector<Task> run;
  for (Task& t : *running)
    if (t.state == TaskState::Running) run.push_back(std::move(t));
  watch_addresses(run);
  for (const Task& t : run) {
    if (stopping_) return;
    tend(t);
  }
  start_queued();
}

// One running task: record what the heartbeats say, then act on judge().
void Daemon::tend(const Task& task) {
  // Its migrate or cancel is still at the plugin: the statuses may not
  // show it yet; the call's end decides what comes next.
  if (call_in_flight(task.id)) return;
  double src_down = 0, dst_down = 0;
  Clock::time_point src_at{}, dst_at{};
  PluginView src = view_of(task.source, &src_down, &src_at);
  PluginView dst = view_of(task.destination, &dst_down, &dst_at);
  const bool unknown = (!src.up && src.phase == "?") || (!dst.up && dst.phase == "?");
  Verdict v;
  if (!unknown) v = judge({task.migration_id, task.destination, task.cancel_requested}, src, dst);
  // Progress: the source's view before handover, the destination's after.
  const bool ours_src = src.up && src.migration_id == task.migration_id && !task.migration_id.empty();
  const bool ours_dst = dst.up && dst.migration_id == task.migration_id && !task.migration_id.empty();
  std::string phase = task.phase;
  if (ours_dst && handed_over_phase(dst.phase)) phase = dst.phase;
  else if (ours_src) phase = src.phase;
  auto status_of = [&](const std::string& a) -> json {
    auto s = heartbeats_->snapshot(a);
    return s ? std::move(s->status) : json();
  };
  const json src_status = status_of(task.source), dst_status = status_of(task.destination);
  const bool handed_over = ours_dst && handed_over_phase(dst.phase);
  const json progress = handed_over ? dst_status.value("migration", json())
                        : ours_src  ? src_status.value("migration", json())
                                    : json();
  if (!config_.metrics_listen.empty()) record_figures(task, src_status, dst_status, ours_src, ours_dst, handed_over);

  modify(task.id, [&](Task& t) REQUIRES(mu_) {
    if (t.state != TaskState::Running) return false;
    Task before = t;
    if (!unknown) {
      t.source_down_since = src_down == 0 ? 0 : (t.source_down_since ? t.source_down_since : src_down);
      t.destination_down_since = dst_down == 0 ? 0 : (t.destination_down_since ? t.destination_down_since : dst_down);
    }
    t.phase = phase;
    if (progress.is_object()) {
      t.blocks_total = progress.value("blocks_total", t.blocks_total);
      t.blocks_left = progress.value("blocks_left", t.blocks_left);
    }
    if (v.action == Action::Wait && !unknown) {
      t.note = v.note;
      if (t.note.empty() && progress.is_object() && progress.value("ready", false) &&
          progress.value("params", json::object()).value("handover", "") == "explicit")
        t.note = fmt::format("ready: waiting for an explicit handover (migrate-nbd handover --from {})", t.source);
    }
    if (v.action == Action::Adopt) {
      t.migration_id = v.adopt_id;
      t.note = "re-attached to migration " + v.adopt_id;
      log(fmt::format("task {}: re-attached to migration {} running at {}", t.id, v.adopt_id, t.source));
    }
    if (v.action == Action::Done || v.action == Action::Failed || v.action == Action::Cancelled) {
      t.state = v.action == Action::Done ? TaskState::Done
                : v.action == Action::Failed ? TaskState::Failed
                                             : TaskState::Cancelled;
      if (v.action == Action::Done) {
        t.blocks_left = 0;
        t.phase = "Done";
      }
      if (v.action == Action::Failed) t.error = v.note;
      t.note.clear();
      t.finished_at = now_unix();
      retry_at_.erase(t.id);
      issued_at_.erase(t.id);
    }
    return t.to_json() != before.to_json();
  });
  if (v.action == Action::Start) {
    {
      MutexLock lock(mu_);
      auto it = retry_at_.find(task.id);
      if (it != retry_at_.end() && Clock::now() < it->second) return;
      // A status older than our last migrate predates the migration it
      // started: wait for fresh answers from both sides before starting again.
      auto issued = issued_at_.find(task.id);
      if (issued != issued_at_.end() && (src_at < issued->second || dst_at < issued->second)) return;
    }
    if (!v.note.empty()) log(fmt::format("task {}: {}", task.id, v.note));
    issue_migrate(task.id, task.attempts == 0);
  } else if (v.action == Action::Cancel) {
    issue_cancel(task.id);
  }
}

bool Daemon::claim_call(int64_t id) {
  MutexLock lock(mu_);
  return in_flight_.insert(id).second;
}

bool Daemon::call_in_flight(int64_t id) {
  MutexLock lock(mu_);
  return in_flight_.count(id) != 0;
}

void Daemon::call_plugin(int64_t id, std::function<void()> fn) {
  std::erase_if(calls_, [](PluginCall& c) {
    if (!c.done->load()) return false;
    c.thread.join();
    return true;
  });
  auto done = std::make_shared<std::atomic<bool>>(false);
  std::thread thread([this, id, fn = std::move(fn), done] {
    fn();
    {
      MutexLock lock(mu_);
      in_flight_.erase(id);
    }
    done->store(true);
  });
  calls_.push_back({std::move(thread), std::move(done)});
}

// The timeouts of migrate and cancel: a plugin the heartbeats saw up
// connects at once (one that hangs is given up after heartbeat-timeout);
// its reply may take long, which is why the call has a thread of its own.
client::Timeouts Daemon::long_call_timeouts() const {
  client::Timeouts timeouts;
  timeouts.connect = to_ms(config_.heartbeat_timeout);
  timeouts.reply = kLongReply;
  return timeouts;
}

void Daemon::issue_migrate(int64_t id, bool first) {
  auto got = store_->get(id);
  if (!got || !*got) return;
  Task task = **got;
  if (task.state != TaskState::Running || !claim_call(id)) return;
  json req = task.request;
  req["op"] = "migrate";
  if (task.rate_cap > 0) req["max_rate"] = task.rate_cap;
  modify(id, [&](Task& t) {
    ++t.attempts;
    t.note = t.attempts == 1 ? "starting" : fmt::format("restarting from pre-copy (attempt {})", t.attempts);
    return true;
  });
  call_plugin(id, [this, id, first, req = std::move(req), source = task.source] {
    client::ControlClient client(client::Target::remote(parse_host_port(source).value()), secret_,
                                 long_call_timeouts());
    auto reply = client.call_raw(req);
    const bool refused = reply && reply->value("ok", false) != true;
    std::string why = !reply ? reply.status().message()
                      : refused ? fmt::format("{}: {}", source, reply->value("error", std::string("refused")))
                                : "";
    modify(id, [&](Task& t) REQUIRES(mu_) {
      if (t.state != TaskState::Running) return false;
      if (why.empty()) {
        issued_at_[t.id] = Clock::now();
        t.migration_id = reply->value("id", reply->value("migration_id", std::string()));
        t.note.clear();
        if (t.attempts > 1) t.error = fmt::format("restarted from pre-copy (attempt {})", t.attempts);
        log(fmt::format("task {} ({}): migration {} started from {} to {}{}", t.id, t.name, t.migration_id, t.source,
                        t.destination, t.rate_cap ? fmt::format(" at most {} bytes/s", t.rate_cap) : ""));
        return true;
      }
      t.error = why;
      if ((first && refused) || t.attempts >= static_cast<int>(config_.max_attempts)) {
        t.state = TaskState::Failed;
        t.note.clear();
        t.finished_at = now_unix();
        if (!first || !refused) t.error = fmt::format("gave up after {} attempts: {}", t.attempts, why);
        return true;
      }
      t.note = fmt::format("migrate failed ({}); retrying in {:g} s", why, config_.retry_delay);
      retry_at_[t.id] = Clock::now() + to_ms(config_.retry_delay);
      return true;
    });
  });
}

bool Daemon::rate_holder_down(const Task& task) {
  auto s = heartbeats_->snapshot(rate_holder(task));
  return s && s->down;
}

// Synchronous on the scheduler thread, on purpose: start_queued must know
// whether a falling cap was taken before it starts anything. What keeps a
// hung plugin (the kernel takes the connection, nothing answers) from
// stalling the thread: a plugin the heartbeats call down is not called,
// and a call is given up after heartbeat-timeout (connect and reply alike),
// by when the heartbeats call a hung plugin down; so it costs one timeout,
// once, not 10 + 30 s on every tick.
bool Daemon::issue_set_rate(int64_t id, uint64_t cap) {
  auto got = store_->get(id);
  if (!got || !*got || (*got)->state != TaskState::Running) return false;
  const Task task = **got;
  client::Timeouts timeouts;
  timeouts.connect = timeouts.reply = to_ms(config_.heartbeat_timeout);
  bool applied = false;
  std::string why;
  for (const std::string& address : {task.source, task.destination}) {
    if (auto s = heartbeats_->snapshot(address); s && s->down) {
      why = fmt::format("{} is down", address);
      continue;
    }
    client::ControlClient client(client::Target::remote(parse_host_port(address).value()), secret_, timeouts);
    auto reply = client.call_raw({{"op", "set-rate"}, {"max_rate", cap}});
    // A side that answers without a running migration (between attempts,
    // or done) moves nothing: the next migrate request carries the cap.
    if (reply && address == rate_holder(task)) applied = true;
    if (!reply) why = reply.status().message();
  }
  if (!applied) {
    log(fmt::format("task {}: rate cap {} not applied ({})", id, cap, why));
    return false;
  }
  modify(id, [&](Task& t) {
    if (t.rate_cap == cap) return false;
    log(fmt::format("task {} ({}): rate cap {} -> {} bytes/s", t.id, t.name, t.rate_cap, cap));
    t.rate_cap = cap;
    return true;
  });
  return true;
}

void Daemon::issue_cancel(int64_t id) {
  auto got = store_->get(id);
  if (!got || !*got || !claim_call(id)) return;
  call_plugin(id, [this, id, source = (*got)->source] {
    client::ControlClient client(client::Target::remote(parse_host_port(source).value()), secret_,
                                 long_call_timeouts());
    auto reply = client.call({{"op", "cancel"}});
    modify(id, [&](Task& t) {
      if (t.state != TaskState::Running) return false;
      if (!reply) {
        t.note = "cancel: " + reply.status().message();
        return true;
      }
      t.state = TaskState::Cancelled;
      t.phase = reply->value("phase", t.phase);
      t.note.clear();
      t.finished_at = now_unix();
      return true;
    });
  });
}

void Daemon::start_queued() {
  // Running tasks whose cap could not be lowered in an earlier pass.
  std::set<int64_t> refused;
  // Each pass that does not end pins one more running task: at most one
  // pass per running task, and one more.
  for (;;) {
    auto active = store_->list(true);
    if (!active) return;
    std::vector<TaskSlot> running, queued;
    std::map<int64_t, const Task*> by_id;
    for (const Task& t : *active) {
      const bool runs = t.state == TaskState::Running;
      const bool pinned = runs && (refused.count(t.id) || rate_holder_down(t) || call_in_flight(t.id));
      TaskSlot s{t.id,       t.source_host(), t.destination_host(), t.request.value("max_rate", uint64_t{0}),
                 t.rate_cap, t.priority,      pinned};
      (runs ? running : queued).push_back(s);
      by_id[t.id] = &t;
    }
    StartPlan plan = plan_starts(running, queued, {config_.max_concurrent, config_.host_bandwidth});
    // The host limit holds throughout: running tasks whose share falls are
    // lowered before anything starts; those whose share rises are raised
    // after. A task whose plugin is down, or did not take its lower cap,
    // goes on at its cap as far as we know: plan again with it pinned
    // there (scheduler.h, "Pinned tasks"). So does a task whose migrate is
    // still on its way: the request carries the cap it was started with.
    auto falls = [&](const StartDecision& d) { return d.rate_cap < by_id[d.id]->rate_cap || by_id[d.id]->rate_cap == 0; };
    bool lowered = true;
    for (const StartDecision& d : plan.rerate)
      if (falls(d) && !issue_set_rate(d.id, d.rate_cap)) {
        refused.insert(d.id);
        lowered = false;
      }
    if (!lowered) continue;
    for (const StartDecision& d : plan.start) {
      bool started = false;
      modify(d.id, [&](Task& t) {
        if (t.state != TaskState::Queued) return false;
        t.state = TaskState::Running;
        t.rate_cap = d.rate_cap;
        t.started_at = now_unix();
        t.note = "starting";
        started = true;
        return true;
      });
      if (started) issue_migrate(d.id, true);
    }
    // A raise not taken leaves the task at its lower cap: the limit holds.
    for (const StartDecision& d : plan.rerate)
      if (!falls(d)) issue_set_rate(d.id, d.rate_cap);
    if (plan.waiting_id)
      modify(plan.waiting_id, [&](Task& t) {
        if (t.state != TaskState::Queued || t.note == plan.waiting) return false;
        t.note = plan.waiting;
        return true;
      });
    return;
  }
}

// ---------------------------------------------------------------- metrics

void Daemon::record_figures(const Task& task, const json& source_status, const json& destination_status,
                            bool ours_source, bool ours_destination, bool handed_over) {
  MutexLock lock(figures_mu_);
  TaskFigures& f = figures_[task.id];
  if (ours_source) f.source = source_status.value("migration", json());
  if (ours_destination) f.destination = destination_status.value("migration", json());
  f.reported_by_destination = f.reported_by_destination || handed_over;
  for (const json* st : {&source_status, &destination_status})
    if (st->is_object() && st->value("block_size", uint64_t{0}) > 0) f.block_size = (*st)["block_size"].get<uint64_t>();
}

MetricsSnapshot Daemon::metrics_snapshot() {
  MetricsSnapshot snap;
  auto tasks = store_->list(false);
  if (!tasks) throw std::runtime_error(tasks.status().message());
  const double now = now_unix();
  {
    MutexLock lock(figures_mu_);
    std::map<int64_t, TaskFigures> shown;
    for (Task& t : *tasks) {
      if (is_final(t.state) && now - t.finished_at > kFinishedShown) continue;
      TaskFigures f;
      if (auto it = figures_.find(t.id); it != figures_.end()) f = std::move(it->second);
      shown[t.id] = f;
      f.task = std::move(t);
      snap.tasks.push_back(std::move(f));
    }
    figures_ = std::move(shown);  // forgets the tasks no longer shown
  }
  for (auto& [address, s] : heartbeats_->snapshots())
    snap.plugins.push_back({address, s.known && !s.down, std::move(s.stats)});
  return snap;
}

// ---------------------------------------------------------------- control ops

std::string Daemon::handle(std::string_view line) {
  json reply;
  try {
    json req = parse_json_object(line);
    if (req.is_discarded()) {
      reply = error_reply(fmt::format("request must be a JSON object (of at most {} levels) such as {{\"op\":\"list\"}}",
                                      kMaxJsonDepth));
    } else {
      std::string op = req.value("op", "");
      if (op == "submit") reply = op_submit(req);
      else if (op == "list") reply = op_list(req);
      else if (op == "show") reply = op_show(req);
      else if (op == "cancel") reply = op_cancel(req);
      else if (op == "status") reply = op_status(req);
      else reply = error_reply(fmt::format("unknown op \"{}\" (known: submit, list, show, cancel, status)", op));
      reply["op"] = op;
    }
  } catch (const std::exception& e) {
    reply = error_reply(fmt::format("internal error: {}", e.what()));
  }
  return reply.dump(-1, ' ', false, json::error_handler_t::replace);
}

json Daemon::op_submit(const json& req) {
  auto r = req.find("request");
  if (r == req.end() || !r->is_object())
    return error_reply("submit: \"request\" must be the migrate request (from, to, mode and parameters)");
  json m = *r;
  m.erase("op");
  if (!m.contains("from") || !m["from"].is_string() || m["from"].get<std::string>().empty())
    return error_reply("submit: \"from\" (the source plugin's HOST:PORT) is required");
  if (!m.contains("to") || !m["to"].is_string() || m["to"].get<std::string>().empty())
    return error_reply("submit: \"to\" (the destination plugin's HOST:PORT) is required");
  auto from = resolve("source", m["from"].get<std::string>());
  if (!from) return error_reply(from.status().message());
  auto to = resolve("destination", m["to"].get<std::string>());
  if (!to) return error_reply(to.status().message());
  if (*from == *to) return error_reply(fmt::format("source and destination are the same plugin ({})", *from));
  m["from"] = *from;
  m["to"] = *to;
  if (!m.contains("mode")) return error_reply("submit: \"mode\" is required (precopy, postcopy, livefs, hybrid or auto)");
  auto params = MigrationParams::from_json(m, HandoverPolicy::Explicit);
  if (!params) return error_reply("bad migration: " + params.status().message());
  int priority = 0;
  if (auto p = req.find("priority"); p != req.end()) {
    if (!p->is_number_integer() || p->get<int64_t>() < 0 || p->get<int64_t>() > kMaxPriority)
      return error_reply(fmt::format("submit: \"priority\" must be an integer from 0 (normal) to {} (most urgent)",
                                     kMaxPriority));
    priority = p->get<int>();
  }

  // Both plugins must answer status now.
  json src_status;
  for (const auto& [what, address] : {std::pair<std::string, std::string>{"source", *from}, {"destination", *to}}) {
    client::Timeouts t;
    t.connect = t.reply = kSubmitTimeout;
    client::ControlClient client(client::Target::remote(parse_host_port(address).value()), secret_, t);
    auto st = client.call_raw({{"op", "status"}});
    if (!st) {
      int e = st.status().errno_value();
      return error_reply(fmt::format("{}: {} {}: {}", is_protocol_errno(e) ? "unknown export" : "unknown host", what,
                                     address, st.status().message()));
    }
    if (st->value("ok", false) != true || !st->contains("phase"))
      return error_reply(fmt::format("unknown export: {} {} does not answer status like a livemig plugin: {:.200}", what,
                                     address, st->dump()));
    if (what == "source") src_status = *st;
    if (what == "source" && st->value("fenced", false))
      return error_reply(fmt::format("the source {} is fenced: it handed its image over in an earlier migration "
                                     "(migrate from the new owner, or make its copy a disk of its own with "
                                     "migrate-nbd release --unfence)",
                                     address));
  }
  Task task;
  task.source = *from;
  task.destination = *to;
  task.mode = mode_name(params->mode());
  task.request = m;
  task.priority = priority;
  task.name = req.value("name", "");
  if (task.name.empty()) {
    std::string image = src_status.value("image", "");
    task.name = image.substr(image.rfind('/') == std::string::npos ? 0 : image.rfind('/') + 1);
  }
  if (task.name.empty()) task.name = *from;
  {
    MutexLock lock(mu_);
    auto active = store_->list(true);
    if (!active) return error_reply(active.status().message());
    for (const Task& t : *active)
      if (t.source == task.source)
        return error_reply(fmt::format("export {} (source {}) already has a migration {}: task {} to {}; cancel it or "
                                       "wait for it to end",
                                       t.name, t.source, state_name(t.state), t.id, t.destination));
    if (Status s = store_->add(task); !s) return error_reply(s.message());
  }
  log(fmt::format("task {} ({}): queued: {} from {} to {}{}", task.id, task.name, task.mode, task.source,
                  task.destination, task.priority ? fmt::format(", priority {}", task.priority) : ""));
  {
    std::lock_guard lock(wake_mu_);
  }
  wake_.notify_all();
  return {{"ok", true}, {"task", task.to_json()}};
}

json Daemon::op_list(const json& req) {
  auto tasks = store_->list(req.value("active", false));
  if (!tasks) return error_reply(tasks.status().message());
  json arr = json::array();
  for (const Task& t : *tasks) arr.push_back(t.to_json());
  return {{"ok", true}, {"tasks", std::move(arr)}, {"time", now_unix()}};
}

json Daemon::op_show(const json& req) {
  if (!req.contains("id") || !req["id"].is_number_integer()) return error_reply("show: \"id\" (a task id) is required");
  auto t = store_->get(req["id"].get<int64_t>());
  if (!t) return error_reply(t.status().message());
  if (!*t) return error_reply(fmt::format("no task {}", req["id"].get<int64_t>()));
  json j = {{"ok", true}, {"task", (*t)->to_json()}, {"time", now_unix()}};
  for (const auto& [key, address] : {std::pair<std::string, std::string>{"source_status", (*t)->source},
                                     {"destination_status", (*t)->destination}}) {
    auto s = heartbeats_ ? heartbeats_->snapshot(address) : std::nullopt;
    if (!s) continue;
    j[key] = s->status;
    // How old that status is (seconds): heartbeats keep it fresh.
    if (s->known) j[key + "_age"] = std::chrono::duration<double>(Clock::now() - s->answered_at).count();
    if (!s->error.empty()) j[key + "_error"] = s->error;
  }
  return j;
}

json Daemon::op_cancel(const json& req) {
  if (!req.contains("id") || !req["id"].is_number_integer()) return error_reply("cancel: \"id\" (a task id) is required");
  const int64_t id = req["id"].get<int64_t>();
  std::string refusal;
  bool found = false;
  modify(id, [&](Task& t) {
    found = true;
    if (is_final(t.state)) {
      refusal = fmt::format("task {} has ended already ({})", id, state_name(t.state));
      return false;
    }
    if (t.state == TaskState::Queued) {
      t.state = TaskState::Cancelled;
      t.finished_at = now_unix();
      t.note.clear();
      return true;
    }
    if (handed_over_phase(t.phase)) {
      refusal = fmt::format("task {} handed over already (phase {}): the destination owns the image now, so it cannot "
                            "be cancelled",
                            id, t.phase);
      return false;
    }
    t.cancel_requested = true;
    t.note = "cancelling";
    return true;
  });
  if (!found) return error_reply(fmt::format("no task {}", id));
  if (!refusal.empty()) return error_reply(refusal);
  {
    std::lock_guard lock(wake_mu_);
  }
  wake_.notify_all();
  // Wait for the scheduler to carry it out.
  UniqueLock lock(mu_);
  changed_.wait_for(lock, kCancelWait, [&] {
    auto t = store_->get(id);
    return stopping_ || !t || !*t || (*t)->state != TaskState::Running;
  });
  lock.unlock();
  auto t = store_->get(id);
  if (!t || !*t) return error_reply(fmt::format("no task {}", id));
  if ((*t)->state == TaskState::Running)
    return error_reply(fmt::format("task {}: cancel asked for, not done yet: {}", id, (*t)->note));
  if ((*t)->state != TaskState::Cancelled)
    return error_reply(fmt::format("task {} ended {} before it could be cancelled", id, state_name((*t)->state)));
  return {{"ok", true}, {"task", (*t)->to_json()}};
}

json Daemon::op_status(const json&) {
  auto tasks = store_->list(true);
  size_t queued = 0, running = 0;
  if (tasks)
    for (const Task& t : *tasks) (t.state == TaskState::Running ? running : queued)++;
  return {{"ok", true},
          {"database", config_.database},
          {"socket", config_.socket},
          {"max_concurrent", config_.max_concurrent},
          {"host_bandwidth", config_.host_bandwidth},
          {"heartbeat_interval", config_.heartbeat_interval},
          {"heartbeat_timeout", config_.heartbeat_timeout},
          {"max_attempts", config_.max_attempts},
          {"queued", queued},
          {"running", running}};
}

}  // namespace livemig::daemon
