// A bounded pool of threads for work that must not run on the io thread:
// disk reads that answer PULLs, hashing for SUMS, fdatasyncs of pushed data,
// and control requests that wait for the peer. Bounded twice: a fixed
// number of threads, and a queue of at most `max_queued` jobs; try_post()
// refuses a job beyond that (the caller answers the peer "busy" instead of
// starting a thread per request, which a peer could abuse).
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstddef>
#include <deque>
#include <functional>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "common/mutex.h"

namespace livemig {

class WorkPool {
 public:
  // No thread starts before start() (nbdkit forks after the engine exists:
  // threads made before the fork would not exist in the child).
  WorkPool(std::string name, size_t threads, size_t max_queued);
  void start();
  ~WorkPool();  // stop()
  WorkPool(const WorkPool&) = delete;
  WorkPool& operator=(const WorkPool&) = delete;

  // Queues `job`; false if the queue is full or the pool stopped.
  bool try_post(std::function<void()> job);
  // Runs the queued jobs, then joins the threads. Idempotent. Jobs posted
  // after stop() are refused.
  void stop();
  size_t queued() const;
  size_t running() const;
  // Each thread runs its next job at this nice value (common/thread_nice.h;
  // best effort: a thread that may not raise its priority back stays lower).
  void set_nice(int nice) { nice_ = nice; }

 private:
  void run();

  const std::string name_;
  const size_t thread_count_;
  const size_t max_queued_;
  mutable Mutex mu_;
  CondVar cv_;
  std::deque<std::function<void()>> jobs_ GUARDED_BY(mu_);
  size_t running_ GUARDED_BY(mu_) = 0;
  bool stopping_ GUARDED_BY(mu_) = false;
  std::vector<std::thread> threads_;
  std::atomic<int> nice_{0};
};

}  // namespace livemig
