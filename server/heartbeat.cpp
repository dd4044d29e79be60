#include "server/heartbeat.h"

#include <future>
#include <vector>

#include <boost/asio/post.hpp>
#include <fmt/format.h>

#include "common/control_reply.h"
#include "common/protocol_format.h"
#include "common/thread_name.h"
#include "server/task_store.h"

namespace livemig::daemon {

using nlohmann::json;
using std::chrono::milliseconds;

namespace {

}  // namespace

// One watched plugin. The link and the call state are the io thread's; what
// the answers said is under mu, for snapshot().
struct HeartbeatLoop::Plugin {
  explicit Plugin(std::string a) : address(std::move(a)), where(parse_host_port(address).value()) {
    last_ok = Clock::now();
  }

  const std::string address;
  const HostPort where;

  // io thread only.
  std::shared_ptr<PeerLink> link;
  bool busy = false;              // a connect or a call is in flight
  Clock::time_point busy_since;   // when the call in flight was sent
  bool forgotten = false;         // no longer watched: no new call

  Mutex mu;
  bool known GUARDED_BY(mu) = false;
  Clock::time_point last_ok GUARDED_BY(mu);  // the last answer, or when watching began
  json status GUARDED_BY(mu);
  json stats GUARDED_BY(mu);
  std::string error GUARDED_BY(mu);

  void failed(const std::string& why) {
    MutexLock lock(mu);
    error = why;
  }
  // Ends the call in flight (io thread); a broken link is dropped, so the
  // next round connects afresh.
  void idle(bool drop_link) {
    busy = false;
    if (drop_link && link) {
      link->close(Status::error("livemigd gave up on this control link", ECONNRESET));
      link.reset();
    }
  }
};

HeartbeatLoop::HeartbeatLoop(std::shared_ptr<const client::SecretChoice> secret, milliseconds interval,
                             milliseconds timeout, bool with_stats)
    : secret_(std::move(secret)),
      interval_(interval),
      timeout_(timeout),
      with_stats_(with_stats),
      work_(boost::asio::make_work_guard(io_)),
      timer_(io_) {
  thread_ = std::thread([this] { io_.run(); });
  name_thread(thread_, "lm-heartbeat");
  boost::asio::post(io_, [this] { round(); });
}

HeartbeatLoop::~HeartbeatLoop() {
  std::promise<void> closed;
  boost::asio::post(io_, [this, &closed] {
    timer_.cancel();
    MutexLock lock(mu_);
    for (auto& [address, p] : plugins_) {
      p->forgotten = true;
      p->idle(true);
    }
    closed.set_value();
  });
  closed.get_future().wait();
  work_.reset();
  io_.stop();
  thread_.join();
}

void HeartbeatLoop::watch(const std::set<std::string>& addresses) {
  std::vector<std::shared_ptr<Plugin>> added, gone;
  {
    MutexLock lock(mu_);
    for (auto it = plugins_.begin(); it != plugins_.end();) {
      if (addresses.count(it->first)) {
        ++it;
        continue;
      }
      gone.push_back(std::move(it->second));
      it = plugins_.erase(it);
    }
    for (const std::string& a : addresses)
      if (!plugins_.count(a)) added.push_back(plugins_[a] = std::make_shared<Plugin>(a));
  }
  if (added.empty() && gone.empty()) return;
  boost::asio::post(io_, [this, added = std::move(added), gone = std::move(gone)] {
    for (auto& p : gone) {
      p->forgotten = true;
      p->idle(true);
    }
    for (auto& p : added) poll(p);
  });
}

std::optional<HeartbeatLoop::Snapshot> HeartbeatLoop::snapshot(const std::string& address) {
  std::shared_ptr<Plugin> p;
  {
    MutexLock lock(mu_);
    auto it = plugins_.find(address);
    if (it == plugins_.end()) return std::nullopt;
    p = it->second;
  }
  MutexLock lock(p->mu);
  Snapshot s;
  s.known = p->known;
  auto silent = Clock::now() - p->last_ok;
  s.down = silent > timeout_;
  if (s.down) s.down_since = now_unix() - std::chrono::duration<double>(silent).count() + timeout_.count() / 1000.0;
  s.answered_at = p->known ? p->last_ok : Clock::time_point{};
  s.status = p->status;
  s.stats = p->stats;
  s.error = p->error;
  return s;
}

std::map<std::string, HeartbeatLoop::Snapshot> HeartbeatLoop::snapshots() {
  std::vector<std::string> addresses;
  {
    MutexLock lock(mu_);
    for (const auto& [address, p] : plugins_) addresses.push_back(address);
  }
  std::map<std::string, Snapshot> out;
  for (const std::string& a : addresses)
    if (auto s = snapshot(a)) out[a] = std::move(*s);
  return out;
}

void HeartbeatLoop::schedule_round() {
  timer_.expires_after(interval_);
  timer_.async_wait([this](boost::system::error_code ec) {
    if (!ec) round();
  });
}

void HeartbeatLoop::round() {
  std::vector<std::shared_ptr<Plugin>> all;
  {
    MutexLock lock(mu_);
    for (const auto& [address, p] : plugins_) all.push_back(p);
  }
  const auto now = Clock::now();
  for (auto& p : all) {
    // A call unanswered for the timeout is given up: closing its link
    // fails the call, whose handler makes the plugin idle again. (A connect
    // has a deadline of its own.)
    if (p->busy && p->link && now - p->busy_since > timeout_)
      p->link->close(Status::error(fmt::format("no reply within {} ms", timeout_.count()), ETIMEDOUT));
    poll(p);
  }
  schedule_round();
}

void HeartbeatLoop::poll(const std::shared_ptr<Plugin>& p) {
  if (p->forgotten || p->busy) return;
  p->busy = true;
  p->busy_since = Clock::now();
  if (p->link && !p->link->closed()) {
    ask_status(p);
    return;
  }
  p->link.reset();
  PeerLink::Options opts;
  opts.local_name = "livemigd";
  opts.tls = secret_->tls;
  PeerLink::async_connect(
      io_, p->where, secret_->secret, kPurposeControl, opts, timeout_,
      [this, p](Result<std::shared_ptr<PeerLink>> link) {
        if (!link) {
          p->failed(client::describe_connect_failure(link.status(), p->where, *secret_, timeout_).message());
          p->idle(false);
          return;
        }
        p->link = std::move(*link);
        if (p->forgotten) {
          p->idle(true);
          return;
        }
        p->link->start([](const std::shared_ptr<PeerLink>&, PeerLink::Frame&) {},  // only replies matter
                       [](const std::shared_ptr<PeerLink>&, const Status&) {});
        ask_status(p);
      });
}

void HeartbeatLoop::ask_status(const std::shared_ptr<Plugin>& p) {
  p->busy_since = Clock::now();
  p->link->call_async(ControlPayload{json{{"op", "status"}}.dump()}, [this, p](Result<PeerLink::Frame> frame) {
    const bool link_failed = !frame;
    auto reply = control_reply_json(std::move(frame), p->address);
    if (!reply || reply->value("ok", false) != true) {
      p->failed(!reply ? reply.status().message()
                       : fmt::format("{}: {}", p->address,
                                     reply->value("error", std::string("the plugin refused status without saying why"))));
      p->idle(link_failed || !reply);
      return;
    }
    {
      MutexLock lock(p->mu);
      p->last_ok = Clock::now();
      p->known = true;
      p->status = std::move(*reply);
      p->error.clear();
    }
    if (!with_stats_ || p->forgotten || !p->link) {
      p->idle(false);
      return;
    }
    p->link->call_async(ControlPayload{json{{"op", "stats"}, {"top", 0}}.dump()},
                        [p](Result<PeerLink::Frame> frame) {
                          const bool failed = !frame;
                          auto stats = control_reply_json(std::move(frame), p->address);
                          if (stats && stats->value("ok", false) == true) {
                            MutexLock lock(p->mu);
                            p->stats = json::object();
                            for (const char* key : {"requests", "connections", "latency"})
                              if (stats->contains(key)) p->stats[key] = std::move((*stats)[key]);
                          }
                          p->idle(failed);
                        });
  });
}

}  // namespace livemig::daemon
