// A mutex, its scoped locks and a condition variable that clang's
// thread-safety analysis understands (common/thread_annotations.h), as
// Abseil's absl::Mutex / LevelDB's port::Mutex do: libstdc++'s std::mutex and
// std::lock_guard carry no annotations, so GUARDED_BY(a std::mutex) would not
// be checked. Each type is a thin inline wrapper over the std one: the same
// size and code.
//
//   mutable Mutex mu_;
//   CondVar cv_;
//   bool ready_ GUARDED_BY(mu_) = false;
//
//   { MutexLock lock(mu_); ready_ = true; }            // std::lock_guard
//   cv_.notify_all();
//   UniqueLock lock(mu_);                              // std::unique_lock
//   cv_.wait(lock, [&]() REQUIRES(mu_) { return ready_; });
//
// A predicate lambda reads guarded members: it says REQUIRES(mu_), which the
// analysis takes on trust at the call inside std::condition_variable.
#pragma once

#include <condition_variable>
#include <mutex>
#include <utility>

#include "common/thread_annotations.h"

namespace livemig {

// std::mutex, known to the analysis as a capability.
class CAPABILITY("mutex") Mutex {
 public:
  Mutex() = default;
  Mutex(const Mutex&) = delete;
  Mutex& operator=(const Mutex&) = delete;

  void lock() ACQUIRE() { mu_.lock(); }
  void unlock() RELEASE() { mu_.unlock(); }
  bool try_lock() TRY_ACQUIRE(true) { return mu_.try_lock(); }

 private:
  friend class UniqueLock;
  std::mutex mu_;
};

// std::lock_guard<Mutex>: holds `mu` for its scope.
class SCOPED_CAPABILITY MutexLock {
 public:
  explicit MutexLock(Mutex& mu) ACQUIRE(mu) : mu_(mu) { mu_.lock(); }
  // Takes over `mu`, already locked by the caller (after try_lock()).
  MutexLock(Mutex& mu, std::adopt_lock_t) REQUIRES(mu) : mu_(mu) {}
  ~MutexLock() RELEASE() { mu_.unlock(); }
  MutexLock(const MutexLock&) = delete;
  MutexLock& operator=(const MutexLock&) = delete;

 private:
  Mutex& mu_;
};

// std::unique_lock<Mutex>: holds `mu` for its scope except between unlock()
// and lock(); what a CondVar waits with.
class SCOPED_CAPABILITY UniqueLock {
 public:
  explicit UniqueLock(Mutex& mu) ACQUIRE(mu) : lock_(mu.mu_) {}
  ~UniqueLock() RELEASE() {}
  UniqueLock(const UniqueLock&) = delete;
  UniqueLock& operator=(const UniqueLock&) = delete;

  void lock() ACQUIRE() { lock_.lock(); }
  void unlock() RELEASE() { lock_.unlock(); }

 private:
  friend class CondVar;
  std::unique_lock<std::mutex> lock_;
};

// std::condition_variable over a UniqueLock. Like it, every wait returns with
// the lock held again.
class CondVar {
 public:
  void notify_one() noexcept { cv_.notify_one(); }
  void notify_all() noexcept { cv_.notify_all(); }

  // wait(lock[, pred]), wait_for(lock, timeout[, pred]) and
  // wait_until(lock, deadline[, pred]) as std::condition_variable's.
  template <class... Args>
  void wait(UniqueLock& lock, Args&&... args) {
    cv_.wait(lock.lock_, std::forward<Args>(args)...);
  }
  template <class... Args>
  auto wait_for(UniqueLock& lock, Args&&... args) {
    return cv_.wait_for(lock.lock_, std::forward<Args>(args)...);
  }
  template <class... Args>
  auto wait_until(UniqueLock& lock, Args&&... args) {
    return cv_.wait_until(lock.lock_, std::forward<Args>(args)...);
  }

 private:
  std::condition_variable cv_;
};

}  // namespace livemig
