#include "plugin/work_pool.h"

#include "common/thread_name.h"
#include "common/thread_nice.h"

namespace livemig {

WorkPool::WorkPool(std::string name, size_t threads, size_t max_queued)
    : name_(std::move(name)), thread_count_(threads), max_queued_(max_queued) {}

void WorkPool::start() {
  MutexLock lock(mu_);
  if (!threads_.empty() || stopping_) return;
  for (size_t i = 0; i < thread_count_; ++i) {
    threads_.emplace_back([this] { run(); });
    name_thread(threads_.back(), name_);
  }
}

WorkPool::~WorkPool() { stop(); }

bool WorkPool::try_post(std::function<void()> job) {
  {
    MutexLock lock(mu_);
    if (stopping_ || jobs_.size() >= max_queued_) return false;
    jobs_.push_back(std::move(job));
  }
  cv_.notify_one();
  return true;
}

void WorkPool::stop() {
  {
    MutexLock lock(mu_);
    if (stopping_ && threads_.empty()) return;
    stopping_ = true;
  }
  cv_.notify_all();
  for (auto& t : threads_)
    if (t.joinable()) t.join();
  threads_.clear();
}

size_t WorkPool::queued() const {
  MutexLock lock(mu_);
  return jobs_.size();
}

size_t WorkPool::running() const {
  MutexLock lock(mu_);
  return running_;
}

void WorkPool::run() {
  int nice = this_thread_nice();  // inherited from start()'s caller; then as last set
  UniqueLock lock(mu_);
  for (;;) {
    cv_.wait(lock, [&]() REQUIRES(mu_) { return stopping_ || !jobs_.empty(); });
    if (jobs_.empty()) return;  // stopping, and nothing left to run
    auto job = std::move(jobs_.front());
    jobs_.pop_front();
    ++running_;
    lock.unlock();
    if (int wanted = nice_; wanted != nice) {
      set_this_thread_nice(wanted);
      nice = wanted;  // tried once per change, not before every job
    }
    try {
      job();
    } catch (...) {
      // A job reports its own failures; one that throws must not end the
      // process that serves the guest.
    }
    lock.lock();
    --running_;
  }
}

}  // namespace livemig
