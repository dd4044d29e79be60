#include "common/mutex.h"

#include <chrono>
#include <thread>

#include <catch2/catch.hpp>

using namespace livemig;
using namespace std::chrono_literals;

namespace {

// What the tests share with a second thread.
struct Shared {
  Mutex mu;
  CondVar cv;
  int value GUARDED_BY(mu) = 0;

  void set(int v) {
    {
      MutexLock lock(mu);
      value = v;
    }
    cv.notify_all();
  }
};

}  // namespace

TEST_CASE("mutex: a wait with a predicate returns once another thread made it true, with the lock held") {
  Shared s;
  std::thread t([&] { s.set(42); });
  UniqueLock lock(s.mu);
  s.cv.wait(lock, [&]() REQUIRES(s.mu) { return s.value == 42; });
  CHECK(s.value == 42);
  lock.unlock();
  t.join();
}

TEST_CASE("mutex: wait_for and wait_until give up at the timeout and say the predicate is still false") {
  Shared s;
  UniqueLock lock(s.mu);
  CHECK_FALSE(s.cv.wait_for(lock, 10ms, [&]() REQUIRES(s.mu) { return s.value != 0; }));
  CHECK(s.cv.wait_for(lock, 1ms) == std::cv_status::timeout);
  CHECK_FALSE(
      s.cv.wait_until(lock, std::chrono::steady_clock::now() + 10ms, [&]() REQUIRES(s.mu) { return s.value != 0; }));
  s.value = 1;  // the lock is held again after each wait
}

TEST_CASE("mutex: a UniqueLock unlocked lets another thread in, and takes the lock again") {
  Shared s;
  UniqueLock lock(s.mu);
  lock.unlock();
  std::thread t([&] { s.set(7); });
  t.join();
  lock.lock();
  CHECK(s.value == 7);
}

TEST_CASE("mutex: try_lock fails while another holds the lock; MutexLock adopts a lock try_lock took") {
  Shared s;
  {
    MutexLock held(s.mu);
    bool got = true;
    std::thread t([&] {
      got = false;
      if (s.mu.try_lock()) {
        got = true;
        s.mu.unlock();
      }
    });
    t.join();
    CHECK_FALSE(got);
  }
  if (!s.mu.try_lock()) {
    FAIL("try_lock of a free mutex failed");
    return;
  }
  MutexLock lock(s.mu, std::adopt_lock);
  s.value = 3;
  CHECK(s.value == 3);
}
