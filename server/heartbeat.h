// livemigd's heartbeats: one loop polls the status of every plugin in use,
// however many there are (issue #15: 30 migrations at once are 60 plugins).
//
// One io_context and the one thread that runs it carry every plugin's
// control link (a PeerLink with purpose "control", as migrate-nbd's). Every
// heartbeat-interval the loop sends each plugin that is not still busy a
// status request (and, with stats, a stats request after it) without
// waiting for the answer; answers update that plugin's record when they
// come. Nothing blocks the thread: a connect or a call that takes longer than
// heartbeat-timeout is given up (its link closed) and tried afresh on the
// next round, so one hung plugin never delays the others' answers.
//
// The verdict rule is the one livemigd always had: a plugin that has not
// answered for heartbeat-timeout is down, whether its calls fail or hang
// (snapshot() judges it from the time of the last answer, so it holds even
// while a call hangs).
//
// Threading: watch() and snapshot() from any thread; the links and the
// per-plugin call state are the io thread's alone.
#pragma once

#include <chrono>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>

#include <boost/asio/executor_work_guard.hpp>
#include <boost/asio/io_context.hpp>
#include <boost/asio/steady_timer.hpp>
#include <nlohmann/json.hpp>

#include "client/control_client.h"
#include "common/mutex.h"

namespace livemig::daemon {

class HeartbeatLoop {
 public:
  using Clock = std::chrono::steady_clock;

  // What the heartbeats last learnt of one plugin.
  struct Snapshot {
    bool known = false;  // an answer arrived since watching began
    bool down = false;   // silent for heartbeat-timeout
    double down_since = 0;            // Unix time the silence began (last answer, or start)
    Clock::time_point answered_at{};  // when the status below arrived
    nlohmann::json status;
    nlohmann::json stats;  // requests, connections, latency of the last stats reply
    std::string error;     // of the last failed call; empty after an answer
  };

  // Starts the loop's thread. with_stats: ask for stats after each status.
  HeartbeatLoop(std::shared_ptr<const client::SecretChoice> secret, std::chrono::milliseconds interval,
                std::chrono::milliseconds timeout, bool with_stats);
  // Closes every link and joins the thread.
  ~HeartbeatLoop();
  HeartbeatLoop(const HeartbeatLoop&) = delete;
  HeartbeatLoop& operator=(const HeartbeatLoop&) = delete;

  // The plugins to watch from now on (peer addresses "HOST:PORT"): new ones
  // are polled at once, the others are forgotten. Any thread.
  void watch(const std::set<std::string>& addresses);

  // The plugin at `address`, if it is watched.
  std::optional<Snapshot> snapshot(const std::string& address);
  // Every watched plugin, by address.
  std::map<std::string, Snapshot> snapshots();

 private:
  struct Plugin;

  // One round: polls every idle plugin, gives up calls older than timeout.
  void round();
  void poll(const std::shared_ptr<Plugin>& p);
  void ask_status(const std::shared_ptr<Plugin>& p);
  void schedule_round();

  const std::shared_ptr<const client::SecretChoice> secret_;
  const std::chrono::milliseconds interval_, timeout_;
  const bool with_stats_;

  // First, so that it outlives every link and timer below.
  boost::asio::io_context io_{1};
  boost::asio::executor_work_guard<boost::asio::io_context::executor_type> work_;
  boost::asio::steady_timer timer_;  // the rounds; io thread only

  Mutex mu_;
  std::map<std::string, std::shared_ptr<Plugin>> plugins_ GUARDED_BY(mu_);

  std::thread thread_;
};

}  // namespace livemig::daemon
