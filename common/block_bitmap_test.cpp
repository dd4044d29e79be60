#include "common/block_bitmap.h"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

using livemig::BlockBitmap;
using livemig::IndexRange;

namespace {

// Checks that exactly the bits of r (and no others) are set in b.
void check_exactly(const BlockBitmap& b, IndexRange r) {
  for (uint64_t i = 0; i < b.size(); ++i) {
    bool want = i >= r.first && i < r.last;
    if (b.test(i) != want) {
      INFO("bit " << i << " range [" << r.first << "," << r.last << ") size " << b.size());
      CHECK(b.test(i) == want);
    }
  }
  CHECK(b.count() == r.count());
}

}  // namespace

TEST_CASE("a new bitmap has every bit clear") {
  for (uint64_t n : {uint64_t{0}, uint64_t{1}, uint64_t{63}, uint64_t{64}, uint64_t{65}, uint64_t{1000}}) {
    BlockBitmap b(n);
    CHECK(b.size() == n);
    CHECK(b.count() == 0);
    CHECK(b.none_set({0, n}));
    CHECK(b.find_next_set(0) == n);
  }
}

TEST_CASE("set, clear and test return the bit's previous value") {
  BlockBitmap b(130);
  CHECK_FALSE(b.test(5));
  CHECK_FALSE(b.set(5));   // was clear
  CHECK(b.test(5));
  CHECK(b.set(5));         // already set
  CHECK(b.test(5));
  CHECK(b.clear(5));       // was set
  CHECK_FALSE(b.test(5));
  CHECK_FALSE(b.clear(5)); // already clear
  CHECK_FALSE(b.test(5));

  // Bits at word edges and the last bit.
  for (uint64_t i : {uint64_t{0}, uint64_t{63}, uint64_t{64}, uint64_t{127}, uint64_t{128}, uint64_t{129}}) {
    INFO("bit " << i);
    CHECK_FALSE(b.set(i));
    CHECK(b.test(i));
  }
  CHECK(b.count() == 6);
  // Neighbours are untouched.
  CHECK_FALSE(b.test(1));
  CHECK_FALSE(b.test(62));
  CHECK_FALSE(b.test(65));
  CHECK_FALSE(b.test(126));
  for (uint64_t i : {uint64_t{0}, uint64_t{63}, uint64_t{64}, uint64_t{127}, uint64_t{128}, uint64_t{129}})
    CHECK(b.clear(i));
  CHECK(b.count() == 0);
}

TEST_CASE("set_range and clear_range change exactly the bits of the range across word boundaries") {
  struct Case {
    uint64_t size;
    IndexRange r;
  };
  auto c = GENERATE(Case{256, {3, 200}}, Case{256, {64, 128}}, Case{256, {0, 1}}, Case{256, {63, 65}},
                    Case{256, {0, 256}}, Case{256, {255, 256}}, Case{200, {3, 200}},
                    Case{200, {0, 200}}, Case{200, {130, 199}}, Case{100, {0, 64}},
                    Case{100, {64, 100}}, Case{1, {0, 1}}, Case{70, {10, 10}}, Case{333, {1, 332}});
  INFO("size " << c.size << " range [" << c.r.first << "," << c.r.last << ")");

  BlockBitmap b(c.size);
  b.set_range(c.r);
  check_exactly(b, c.r);
  CHECK(b.all_set(c.r));
  CHECK(b.count_range(c.r) == c.r.count());

  // Setting the range again changes nothing.
  b.set_range(c.r);
  check_exactly(b, c.r);

  // Clearing a range inside a full map clears exactly that range.
  BlockBitmap full(c.size);
  full.set_range({0, c.size});
  CHECK(full.count() == c.size);
  full.clear_range(c.r);
  CHECK(full.count() == c.size - c.r.count());
  CHECK(full.none_set(c.r));
  for (uint64_t i = 0; i < c.size; ++i) {
    bool want = !(i >= c.r.first && i < c.r.last);
    if (full.test(i) != want) {
      INFO("bit " << i);
      CHECK(full.test(i) == want);
    }
  }

  b.clear_range(c.r);
  CHECK(b.count() == 0);
}

TEST_CASE("test_and_clear_range counts the set bits it clears") {
  BlockBitmap b(300);
  for (uint64_t i = 0; i < 300; i += 3) b.set(i);  // 100 bits: 0,3,...,297
  REQUIRE(b.count() == 100);

  // [3, 200): multiples of 3 from 3 to 198 -> 66 bits, across word boundaries.
  CHECK(b.test_and_clear_range({3, 200}) == 66);
  CHECK(b.none_set({3, 200}));
  CHECK(b.count() == 34);
  CHECK(b.test(0));
  CHECK(b.test(201));
  // A second pass finds nothing.
  CHECK(b.test_and_clear_range({3, 200}) == 0);
  // An empty range counts nothing and clears nothing.
  CHECK(b.test_and_clear_range({0, 0}) == 0);
  CHECK(b.test(0));
  // The rest.
  CHECK(b.test_and_clear_range({0, 300}) == 34);
  CHECK(b.count() == 0);

  // A full word at once.
  b.set_range({64, 128});
  CHECK(b.test_and_clear_range({64, 128}) == 64);
  b.set_range({0, 300});
  CHECK(b.test_and_clear_range({0, 300}) == 300);
  CHECK(b.count() == 0);
}

TEST_CASE("all_set, none_set and count_range look only inside the range") {
  BlockBitmap b(200);
  b.set_range({60, 70});
  CHECK(b.all_set({60, 70}));
  CHECK(b.all_set({63, 65}));
  CHECK_FALSE(b.all_set({59, 70}));
  CHECK_FALSE(b.all_set({60, 71}));
  CHECK(b.none_set({0, 60}));
  CHECK(b.none_set({70, 200}));
  CHECK_FALSE(b.none_set({0, 61}));
  CHECK_FALSE(b.none_set({69, 200}));
  CHECK(b.count_range({0, 200}) == 10);
  CHECK(b.count_range({0, 64}) == 4);
  CHECK(b.count_range({64, 128}) == 6);
  CHECK(b.count_range({65, 66}) == 1);
  CHECK(b.count_range({70, 200}) == 0);
  // An empty range: all set and none set, count zero.
  CHECK(b.all_set({5, 5}));
  CHECK(b.none_set({65, 65}));
  CHECK(b.count_range({65, 65}) == 0);
}

TEST_CASE("find_next_set and find_next_clear scan across words and stop at the end") {
  BlockBitmap b(200);  // last word holds bits 192..199 only
  b.set(5);
  b.set(64);
  b.set(190);
  CHECK(b.find_next_set(0) == 5);
  CHECK(b.find_next_set(5) == 5);
  CHECK(b.find_next_set(6) == 64);
  CHECK(b.find_next_set(65) == 190);
  CHECK(b.find_next_set(191) == 200);
  CHECK(b.find_next_set(199) == 200);
  CHECK(b.find_next_set(200) == 200);
  CHECK(b.find_next_set(1000) == 200);

  CHECK(b.find_next_clear(5) == 6);
  CHECK(b.find_next_clear(0) == 0);

  BlockBitmap full(200);
  full.set_range({0, 200});
  // The padding bits past size() are clear in memory; they must not be found.
  CHECK(full.find_next_clear(0) == 200);
  CHECK(full.find_next_clear(150) == 200);
  CHECK(full.find_next_clear(199) == 200);
  CHECK(full.find_next_clear(200) == 200);
  full.clear(130);
  CHECK(full.find_next_clear(0) == 130);
  CHECK(full.find_next_clear(130) == 130);
  CHECK(full.find_next_clear(131) == 200);
  full.clear(199);
  CHECK(full.find_next_clear(131) == 199);

  // Exactly one word; the end at a word boundary.
  BlockBitmap w(64);
  w.set_range({0, 64});
  CHECK(w.find_next_clear(0) == 64);
  w.clear_range({0, 64});
  CHECK(w.find_next_set(0) == 64);
  w.set(63);
  CHECK(w.find_next_set(0) == 63);

  // An empty map.
  BlockBitmap e(0);
  CHECK(e.find_next_set(0) == 0);
  CHECK(e.find_next_clear(0) == 0);
}

TEST_CASE("next_set_run returns contiguous runs, capped at max_len, and an empty range at the end") {
  BlockBitmap b(300);
  b.set_range({10, 20});
  b.set_range({60, 140});   // spans two word boundaries
  b.set_range({290, 300});  // reaches the end of the map

  CHECK(b.next_set_run(0) == IndexRange{10, 20});
  CHECK(b.next_set_run(15) == IndexRange{15, 20});
  CHECK(b.next_set_run(20) == IndexRange{60, 140});
  CHECK(b.next_set_run(140) == IndexRange{290, 300});
  CHECK(b.next_set_run(299) == IndexRange{299, 300});
  CHECK(b.next_set_run(300) == IndexRange{300, 300});
  CHECK(b.next_set_run(300).empty());

  SECTION("max_len caps the run") {
    CHECK(b.next_set_run(0, 4) == IndexRange{10, 14});
    CHECK(b.next_set_run(14, 4) == IndexRange{14, 18});
    CHECK(b.next_set_run(18, 4) == IndexRange{18, 20});  // shorter than max_len
    CHECK(b.next_set_run(20, 64) == IndexRange{60, 124});
    CHECK(b.next_set_run(124, 64) == IndexRange{124, 140});
    CHECK(b.next_set_run(140, 5) == IndexRange{290, 295});
    CHECK(b.next_set_run(295, 5) == IndexRange{295, 300});
    CHECK(b.next_set_run(0, 1) == IndexRange{10, 11});
    CHECK(b.next_set_run(0, 10) == IndexRange{10, 20});
  }

  SECTION("walking the runs visits every set bit once") {
    uint64_t total = 0;
    std::vector<IndexRange> runs;
    for (IndexRange r = b.next_set_run(0, 7); !r.empty(); r = b.next_set_run(r.last, 7)) {
      CHECK(r.count() <= 7);
      CHECK(b.all_set(r));
      total += r.count();
      runs.push_back(r);
    }
    CHECK(total == b.count());
    CHECK(total == 100);
  }

  SECTION("a map with no set bit has no run") {
    BlockBitmap e(100);
    CHECK(e.next_set_run(0) == IndexRange{100, 100});
    BlockBitmap z(0);
    CHECK(z.next_set_run(0) == IndexRange{0, 0});
  }

  SECTION("a fully set map is one run") {
    BlockBitmap f(333);
    f.set_range({0, 333});
    CHECK(f.next_set_run(0) == IndexRange{0, 333});
    CHECK(f.next_set_run(0, 100) == IndexRange{0, 100});
  }
}

TEST_CASE("serialize and deserialize round-trip the bits") {
  auto n = GENERATE(uint64_t{0}, uint64_t{1}, uint64_t{8}, uint64_t{63}, uint64_t{64}, uint64_t{65},
                    uint64_t{200}, uint64_t{1000});
  INFO("size " << n);
  BlockBitmap a(n);
  std::mt19937_64 rng(n + 17);
  for (uint64_t i = 0; i < n; ++i)
    if (rng() & 1) a.set(i);
  if (n > 0) a.set(n - 1);

  std::string bytes = a.serialize();
  CHECK(bytes.size() == (n + 63) / 64 * 8);

  BlockBitmap b(n);
  b.set_range({0, n / 2});  // stale content must be replaced
  REQUIRE(b.deserialize(bytes));
  CHECK(b.count() == a.count());
  for (uint64_t i = 0; i < n; ++i)
    if (a.test(i) != b.test(i)) {
      INFO("bit " << i);
      CHECK(a.test(i) == b.test(i));
    }
  CHECK(b.serialize() == bytes);
}

TEST_CASE("serialize writes words little-endian") {
  BlockBitmap b(128);
  b.set(0);
  b.set(9);
  b.set(64 + 63);
  std::string s = b.serialize();
  REQUIRE(s.size() == 16);
  CHECK(static_cast<unsigned char>(s[0]) == 0x01);
  CHECK(static_cast<unsigned char>(s[1]) == 0x02);
  for (int i = 2; i < 15; ++i) CHECK(s[i] == '\0');
  CHECK(static_cast<unsigned char>(s[15]) == 0x80);
}

TEST_CASE("deserialize rejects a byte string of the wrong length and keeps the bits") {
  BlockBitmap b(100);  // two words: 16 bytes
  b.set(42);
  std::string good = b.serialize();
  REQUIRE(good.size() == 16);
  CHECK_FALSE(b.deserialize(""));
  CHECK_FALSE(b.deserialize(std::string(8, '\xff')));
  CHECK_FALSE(b.deserialize(std::string(13, '\xff')));  // (100+7)/8, not rounded to a word
  CHECK_FALSE(b.deserialize(std::string(15, '\xff')));
  CHECK_FALSE(b.deserialize(std::string(17, '\xff')));
  CHECK_FALSE(b.deserialize(std::string(24, '\xff')));
  CHECK(b.count() == 1);
  CHECK(b.test(42));

  BlockBitmap e(0);
  CHECK(e.deserialize(""));
  CHECK_FALSE(e.deserialize(std::string(8, '\0')));
}

TEST_CASE("deserialize never sets bits beyond size") {
  auto n = GENERATE(uint64_t{1}, uint64_t{50}, uint64_t{100}, uint64_t{127}, uint64_t{129});
  INFO("size " << n);
  BlockBitmap b(n);
  std::string all_ones((n + 63) / 64 * 8, '\xff');
  REQUIRE(b.deserialize(all_ones));
  CHECK(b.count() == n);
  CHECK(b.all_set({0, n}));
  CHECK(b.find_next_clear(0) == n);
  CHECK(b.next_set_run(0) == IndexRange{0, n});
  // The padding came back clear: a round trip carries no bits past size().
  std::string again = b.serialize();
  BlockBitmap wide(again.size() * 8);
  REQUIRE(wide.deserialize(again));
  CHECK(wide.count() == n);
  CHECK(wide.find_next_set(n) == wide.size());
  // test_and_clear over the whole map finds exactly size() bits.
  CHECK(b.test_and_clear_range({0, n}) == n);
  CHECK(b.serialize() == std::string(all_ones.size(), '\0'));
}

// The concurrency tests below keep several threads working on the same few
// words for many iterations at once, so that a read-modify-write that is not
// atomic would lose an update in practice, not just in theory.

TEST_CASE("concurrent set of disjoint bits from several threads loses nothing") {
  constexpr uint64_t kBits = 2 * 64 + 7;  // three words, the last partial
  constexpr int kThreads = 4;
  constexpr int kRounds = 20000;
  BlockBitmap b(kBits);
  std::atomic<int> ready{0};
  std::vector<uint64_t> wrong(kThreads, 0), newly(kThreads, 0);
  // Thread t owns bits i with i % kThreads == t, spread over every word. It
  // sets and clears them over and over: since nobody else touches its bits,
  // every set must find its bit clear and every clear must find it set; a
  // lost update by another thread's write to the same word would show here.
  // It ends with its bits set.
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      ready.fetch_add(1);
      while (ready.load() < kThreads) std::this_thread::yield();
      for (int r = 0; r < kRounds; ++r) {
        for (uint64_t i = t; i < kBits; i += kThreads)
          if (b.set(i)) ++wrong[t];
        for (uint64_t i = t; i < kBits; i += kThreads)
          if (!b.clear(i)) ++wrong[t];
      }
      for (uint64_t i = t; i < kBits; i += kThreads)
        if (!b.set(i)) ++newly[t];
    });
  for (auto& th : threads) th.join();
  uint64_t bad = 0, sum = 0;
  for (int t = 0; t < kThreads; ++t) {
    bad += wrong[t];
    sum += newly[t];
  }
  CHECK(bad == 0);
  CHECK(sum == kBits);
  CHECK(b.count() == kBits);
  CHECK(b.all_set({0, kBits}));
}

TEST_CASE("concurrent set of overlapping bits from several threads loses nothing") {
  constexpr uint64_t kBits = 64 * 4;
  constexpr int kThreads = 4;
  constexpr int kRounds = 20000;
  BlockBitmap b(kBits);
  std::atomic<int> ready{0};
  std::vector<uint64_t> wrong(kThreads, 0), newly(kThreads, 0);
  // Bits 0, 4, 8, ... are shared: at the end every thread sets all of them
  // and counts the 0->1 transitions it caused. Every other bit i is private to
  // thread (i / 4) % kThreads, which first toggles it many times (checking
  // each previous value, as in the disjoint test) and finally sets it. Shared
  // and private bits live in the same words.
  auto owner = [&](uint64_t i) { return int((i / 4) % kThreads); };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      ready.fetch_add(1);
      while (ready.load() < kThreads) std::this_thread::yield();
      for (int r = 0; r < kRounds; ++r) {
        for (uint64_t i = 0; i < kBits; ++i)
          if (i % 4 != 0 && owner(i) == t && b.set(i)) ++wrong[t];
        for (uint64_t i = 0; i < kBits; ++i)
          if (i % 4 != 0 && owner(i) == t && !b.clear(i)) ++wrong[t];
      }
      // Shared bits, walked upwards by even threads and downwards by odd ones.
      for (uint64_t k = 0; k < kBits / 4; ++k) {
        uint64_t i = t % 2 == 0 ? 4 * k : kBits - 4 - 4 * k;
        if (!b.set(i)) ++newly[t];
      }
      for (uint64_t i = 0; i < kBits; ++i)
        if (i % 4 != 0 && owner(i) == t && b.set(i)) ++wrong[t];
    });
  for (auto& th : threads) th.join();
  uint64_t bad = 0, sum = 0;
  for (int t = 0; t < kThreads; ++t) {
    bad += wrong[t];
    sum += newly[t];
  }
  CHECK(bad == 0);
  // Each shared bit's 0->1 transition was seen by exactly one thread.
  CHECK(sum == kBits / 4);
  CHECK(b.count() == kBits);
}

TEST_CASE("concurrent set_range and clear_range over shared words lose nothing") {
  constexpr uint64_t kBits = 64 * 2 + 3;
  constexpr int kThreads = 4;
  constexpr int kRounds = 60000;
  constexpr uint64_t kRun = 5;  // runs of 5 bits often straddle a word boundary
  BlockBitmap b(kBits);
  std::atomic<int> ready{0};
  std::vector<uint64_t> wrong(kThreads, 0);
  // Thread t owns the runs starting at kRun * (kThreads * k + t): the runs
  // tile the map. It sets them with set_range and claims them back with
  // test_and_clear_range, which must find every bit of its runs set.
  auto runs_of = [&](int t) {
    std::vector<IndexRange> out;
    for (uint64_t i = kRun * t; i < kBits; i += kRun * kThreads) out.push_back({i, std::min(i + kRun, kBits)});
    return out;
  };
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t)
    threads.emplace_back([&, t] {
      auto runs = runs_of(t);
      ready.fetch_add(1);
      while (ready.load() < kThreads) std::this_thread::yield();
      for (int r = 0; r < kRounds; ++r) {
        for (IndexRange run : runs) b.set_range(run);
        for (IndexRange run : runs)
          if (b.test_and_clear_range(run) != run.count()) ++wrong[t];
        for (IndexRange run : runs) b.set_range(run);
        for (IndexRange run : runs) b.clear_range(run);
        for (IndexRange run : runs)
          if (!b.none_set(run)) ++wrong[t];
      }
      for (IndexRange run : runs) b.set_range(run);
    });
  for (auto& th : threads) th.join();
  uint64_t bad = 0;
  for (uint64_t w : wrong) bad += w;
  CHECK(bad == 0);
  CHECK(b.count() == kBits);
  CHECK(b.all_set({0, kBits}));
}

TEST_CASE("a sender's test_and_clear_range never loses a concurrent writer's set") {
  constexpr uint64_t kBits = 1000;  // several words, last one partial
  constexpr uint64_t kWrites = 400000;
  BlockBitmap b(kBits);
  std::atomic<bool> go{false};
  std::atomic<bool> done{false};
  uint64_t transitions = 0;  // 0->1 transitions the writer caused
  uint64_t cleared = 0;      // bits the sender claimed

  std::thread writer([&] {
    while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
    std::mt19937_64 rng(42);
    for (uint64_t n = 0; n < kWrites; ++n) {
      uint64_t i = rng() % kBits;
      if (!b.set(i)) ++transitions;
    }
    done.store(true, std::memory_order_release);
  });
  std::thread sender([&] {
    std::mt19937_64 rng(7);
    go.store(true, std::memory_order_release);
    while (!done.load(std::memory_order_acquire)) {
      // Claims of assorted ranges, word-aligned or not, as a sender would.
      uint64_t a = rng() % kBits;
      uint64_t len = 1 + rng() % 200;
      cleared += b.test_and_clear_range({a, std::min(a + len, kBits)});
      if ((rng() & 15) == 0) cleared += b.test_and_clear_range({0, kBits});
    }
  });
  writer.join();
  sender.join();

  uint64_t final_count = b.count();
  INFO("transitions " << transitions << " cleared " << cleared << " left " << final_count);
  CHECK(transitions == cleared + final_count);
  // Every bit was picked many times, and claimed bits are set again.
  CHECK(transitions >= kBits);
}

TEST_CASE("several writers and a sender account for every set bit") {
  constexpr uint64_t kBits = 777;
  constexpr int kWriters = 3;
  constexpr uint64_t kWritesEach = 150000;
  BlockBitmap b(kBits);
  std::atomic<int> running{kWriters};
  std::vector<uint64_t> transitions(kWriters, 0);
  uint64_t cleared = 0;

  std::vector<std::thread> writers;
  for (int t = 0; t < kWriters; ++t)
    writers.emplace_back([&, t] {
      std::mt19937_64 rng(100 + t);
      for (uint64_t n = 0; n < kWritesEach; ++n)
        if (!b.set(rng() % kBits)) ++transitions[t];
      running.fetch_sub(1, std::memory_order_acq_rel);
    });
  std::thread sender([&] {
    // Walk the dirty runs like a sender does, claiming each.
    while (running.load(std::memory_order_acquire) > 0) {
      for (IndexRange r = b.next_set_run(0, 16); !r.empty(); r = b.next_set_run(r.last, 16))
        cleared += b.test_and_clear_range(r);
    }
  });
  for (auto& w : writers) w.join();
  sender.join();

  uint64_t total = 0;
  for (uint64_t n : transitions) total += n;
  CHECK(total == cleared + b.count());
}

// ---- pages (issue #15: memory follows the bits, not the size)

TEST_CASE("random operations across page boundaries match a plain model") {
  constexpr uint64_t kPage = BlockBitmap::kPageBits;
  const uint64_t bits = 3 * kPage + 1000;  // the last page partial
  BlockBitmap b(bits);
  std::vector<bool> model(bits, false);
  std::mt19937_64 rng(1234);
  auto pick_range = [&] {
    switch (rng() % 4) {
      case 0: {  // a whole page
        uint64_t p = rng() % 4;
        return IndexRange{p * kPage, std::min((p + 1) * kPage, bits)};
      }
      case 1: {  // several pages, unaligned
        uint64_t a = rng() % bits;
        return IndexRange{a, std::min(bits, a + rng() % (2 * kPage))};
      }
      default: {  // a few bits
        uint64_t a = rng() % bits;
        return IndexRange{a, std::min(bits, a + 1 + rng() % 300)};
      }
    }
  };
  for (int op = 0; op < 3000; ++op) {
    IndexRange r = pick_range();
    uint64_t want_changed = 0;
    const int kind = rng() % 5;
    if (kind == 0 || kind == 1) {
      for (uint64_t i = r.first; i < r.last; ++i) want_changed += !model[i], model[i] = true;
      REQUIRE(b.set_range(r) == want_changed);
    } else if (kind == 2 || kind == 3) {
      for (uint64_t i = r.first; i < r.last; ++i) want_changed += model[i], model[i] = false;
      REQUIRE(b.test_and_clear_range(r) == want_changed);
    } else {
      uint64_t i = rng() % bits;
      bool was = model[i];
      model[i] = !was;
      REQUIRE((was ? b.clear(i) : !b.set(i)));
    }
    if (op % 100 == 0 || op == 2999) {
      IndexRange q = pick_range();
      uint64_t n = 0;
      for (uint64_t i = q.first; i < q.last; ++i) n += model[i];
      REQUIRE(b.count_range(q) == n);
      REQUIRE(b.all_set(q) == (n == q.count()));
      REQUIRE(b.none_set(q) == (n == 0));
      uint64_t next_set = q.first, next_clear = q.first;
      while (next_set < bits && !model[next_set]) ++next_set;
      while (next_clear < bits && model[next_clear]) ++next_clear;
      REQUIRE(b.find_next_set(q.first) == next_set);
      REQUIRE(b.find_next_clear(q.first) == next_clear);
      // Bounded: the first before q.last, or q.last.
      REQUIRE(b.find_next_set(q.first, q.last) == std::min(next_set, q.last));
      REQUIRE(b.find_next_clear(q.first, q.last) == std::min(next_clear, q.last));
      REQUIRE(b.find_next_set(q.first, bits + 5) == next_set);
    }
  }
  for (uint64_t i = 0; i < bits; ++i)
    if (b.test(i) != model[i]) FAIL("bit " << i << " differs from the model");
  BlockBitmap copy(bits);
  REQUIRE(copy.deserialize(b.serialize()));
  CHECK(copy.serialize() == b.serialize());  // bits beyond size() included: clear in both
}

TEST_CASE("a bitmap costs memory for mixed pages only") {
  const uint64_t bits = uint64_t{1} << 28;  // 1 TiB of 4 KiB blocks: 32 MiB dense
  BlockBitmap b(bits);
  const uint64_t empty = b.memory_bytes();
  CHECK(empty < 128 * 1024);
  CHECK(b.set_range({0, bits}) == bits);  // a source owes everything
  CHECK(b.memory_bytes() == empty);
  CHECK(b.count() == bits);
  CHECK(b.find_next_clear(0) == bits);
  // Claiming whole pages costs nothing; one unit inside a page costs that page.
  CHECK(b.test_and_clear_range({0, 10 * BlockBitmap::kPageBits}) == 10 * BlockBitmap::kPageBits);
  CHECK(b.memory_bytes() == empty);
  CHECK(b.test_and_clear_range({20 * BlockBitmap::kPageBits + 5, 20 * BlockBitmap::kPageBits + 261}) == 256);
  CHECK(b.memory_bytes() == empty + 4096);
  CHECK(b.count() == bits - 10 * BlockBitmap::kPageBits - 256);
  CHECK(b.find_next_clear(10 * BlockBitmap::kPageBits) == 20 * BlockBitmap::kPageBits + 5);
  // A sender that claims the rest of that page unit by unit gives its memory back.
  for (uint64_t at = 20 * BlockBitmap::kPageBits; at < 21 * BlockBitmap::kPageBits; at += 256)
    b.test_and_clear_range({at, at + 256});
  CHECK(b.memory_bytes() == empty);
  CHECK(b.count() == bits - 11 * BlockBitmap::kPageBits);
  CHECK(b.none_set({20 * BlockBitmap::kPageBits, 21 * BlockBitmap::kPageBits}));
  CHECK(b.test(21 * BlockBitmap::kPageBits));
  // ... and a page set again bit by bit after that is mixed, then costs a page.
  CHECK(b.set(20 * BlockBitmap::kPageBits + 7) == false);
  CHECK(b.test(20 * BlockBitmap::kPageBits + 7));
  CHECK(b.memory_bytes() == empty + 4096);
  // Loading a state file's words keeps uniform pages without words.
  BlockBitmap loaded(bits);
  std::string page_of_ones(BlockBitmap::kPageWords * 8, '\xff');
  for (uint64_t p = 0; p < 64; ++p) REQUIRE(loaded.load_words(p * BlockBitmap::kPageWords, page_of_ones));
  CHECK(loaded.count() == 64 * BlockBitmap::kPageBits);
  CHECK(loaded.memory_bytes() == empty);
}

TEST_CASE("writers and claimers over whole pages and single bits account for every bit") {
  const uint64_t bits = 2 * BlockBitmap::kPageBits + 77;
  BlockBitmap b(bits);
  std::atomic<int> running{2};
  uint64_t set_changed[2] = {0, 0};
  uint64_t cleared = 0;
  std::vector<std::thread> writers;
  for (int t = 0; t < 2; ++t)
    writers.emplace_back([&, t] {
      std::mt19937_64 rng(500 + t);
      for (int n = 0; n < 60000; ++n) {
        if (rng() % 64 == 0) {  // a whole page or the whole map: full pages without words
          uint64_t p = rng() % 3;
          IndexRange r = (rng() & 1) ? IndexRange{0, bits}
                                     : IndexRange{p * BlockBitmap::kPageBits,
                                                  std::min((p + 1) * BlockBitmap::kPageBits, bits)};
          set_changed[t] += b.set_range(r);
        } else {
          set_changed[t] += !b.set(rng() % bits);
        }
      }
      running.fetch_sub(1, std::memory_order_acq_rel);
    });
  std::thread claimer([&] {
    std::mt19937_64 rng(9);
    while (running.load(std::memory_order_acquire) > 0) {
      uint64_t p = rng() % 3;
      if (rng() & 1)
        cleared += b.test_and_clear_range({p * BlockBitmap::kPageBits, std::min((p + 1) * BlockBitmap::kPageBits, bits)});
      else
        for (IndexRange r = b.next_set_run(rng() % bits, 256); !r.empty(); r = b.next_set_run(r.last, 256))
          cleared += b.test_and_clear_range(r);
    }
  });
  for (auto& w : writers) w.join();
  claimer.join();
  CHECK(set_changed[0] + set_changed[1] == cleared + b.count());
}
