// Unit tests of lm-workload's block format, journal replay and helpers. The
// behaviour against real servers is in workload_selftest.sh.
#include "client-tools/lm_workload_block.h"
#include "client-tools/lm_workload_journal.h"
#include "client-tools/lm_workload_util.h"
#include "client-tools/lm_workload_write.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include <catch2/catch.hpp>

using namespace livemig::workload;

namespace {

std::vector<uint8_t> make_block(uint64_t block, uint64_t gen, uint64_t seed, size_t size = 4096) {
  std::vector<uint8_t> b(size);
  encode_block(BlockId{block, gen, seed}, b);
  return b;
}

// A temporary file name, removed at the end of the scope.
struct TempPath {
  std::string path;
  TempPath() {
    char tmpl[] = "/tmp/lm-workload-unit.XXXXXX";
    int fd = mkstemp(tmpl);
    REQUIRE(fd >= 0);
    close(fd);
    path = tmpl;
  }
  ~TempPath() { std::remove(path.c_str()); }
};

struct Rec {
  RecordType type;
  uint64_t a;
  uint64_t b = 0;
};

// Writes a journal (block size 4096, seed 99) of one run, RUN_START and the
// run's first CONNECT followed by `records`, and replays it.
JournalSummary replay_run(const std::vector<Rec>& records) {
  TempPath p;
  {
    auto w = JournalWriter::create(p.path, JournalHeader{4096, 99, 1 << 20, 0});
    REQUIRE(w);
    (*w)->add(RecordType::kRunStart, 0, 256);
    (*w)->add(RecordType::kConnect, 1);
    for (const Rec& r : records) (*w)->add(r.type, r.a, r.b);
    REQUIRE((*w)->sync());
  }
  auto s = read_journal(p.path);
  REQUIRE(s);
  return std::move(*s);
}

using enum RecordType;

}  // namespace

TEST_CASE("a block decodes as the block, generation and seed it was encoded with") {
  for (size_t size : {512u, 4096u, 65536u}) {
    auto b = make_block(123456789, 42, 0xfeed, size);
    DecodedBlock d = decode_block(b);
    CHECK(d.kind == DecodedBlock::Kind::kValid);
    CHECK(d.id == BlockId{123456789, 42, 0xfeed});
  }
}

TEST_CASE("different generations of a block differ in every sector") {
  auto a = make_block(7, 1, 1);
  auto b = make_block(7, 2, 1);
  for (size_t s = 0; s < a.size(); s += kSectorSize)
    CHECK(std::vector<uint8_t>(a.begin() + s, a.begin() + s + kSectorSize) !=
          std::vector<uint8_t>(b.begin() + s, b.begin() + s + kSectorSize));
}

TEST_CASE("an all-zero block decodes as zeros") {
  std::vector<uint8_t> z(4096, 0);
  CHECK(decode_block(z).kind == DecodedBlock::Kind::kZero);
}

TEST_CASE("a block torn between two generations is reported sector by sector") {
  auto b = make_block(9, 5, 3);
  auto newer = make_block(9, 6, 3);
  std::copy(newer.begin() + 2048, newer.end(), b.begin() + 2048);
  DecodedBlock d = decode_block(b);
  CHECK(d.kind == DecodedBlock::Kind::kMixed);
  CHECK(d.detail == "sectors 0-3: block 9 generation 5; sectors 4-7: block 9 generation 6");
  CHECK(d.sector_ids.size() == 2);
}

TEST_CASE("a flipped bit is caught by the checksum") {
  auto b = make_block(1, 1, 1);
  b[1000] ^= 0x10;
  DecodedBlock d = decode_block(b);
  CHECK(d.kind == DecodedBlock::Kind::kMixed);
  CHECK(d.detail == "sector 0: block 1 generation 1; sector 1: bad checksum; sectors 2-7: block 1 generation 1");
}

TEST_CASE("sectors swapped inside a block are caught") {
  auto b = make_block(1, 1, 1);
  std::swap_ranges(b.begin(), b.begin() + 512, b.begin() + 512);
  DecodedBlock d = decode_block(b);
  CHECK(d.kind == DecodedBlock::Kind::kMixed);
  CHECK(d.detail.find("sector from another position") != std::string::npos);
}

TEST_CASE("a block read with another block size is not valid") {
  auto b = make_block(1, 1, 1, 8192);
  DecodedBlock d = decode_block(std::span<const uint8_t>(b.data(), 4096));
  CHECK(d.kind == DecodedBlock::Kind::kMixed);
}

TEST_CASE("a flush covers exactly the writes acknowledged before it was issued") {
  const JournalSummary s = replay_run({
      {kAck, 1, 1},
      {kFlushIssued, 1},
      {kAck, 2, 1},  // acknowledged while the flush was in flight: not covered
      {kFlushDone, 1},
      {kAckFua, 3, 1},
      {kAck, 1, 2},
      {kWriteFailed, 4, 1},
      {kFlushIssued, 2},  // never completes
      {kAck, 5, 1},
  });
  CHECK(s.header.block_size == 4096);
  CHECK(s.header.seed == 99);
  CHECK(s.records == 11);
  CHECK(s.connections == 1);
  CHECK_FALSE(s.last_run_ended);
  auto h = [&](uint64_t b) { return s.blocks.at(b); };
  CHECK((h(1).acked == 2 && h(1).durable == 1 && h(1).issued == 2));
  CHECK((h(2).acked == 1 && h(2).durable == 0));
  CHECK((h(3).acked == 1 && h(3).durable == 1));
  CHECK((h(4).acked == 0 && h(4).durable == 0 && h(4).issued == 1));
  CHECK((h(5).acked == 1 && h(5).durable == 0));
  CHECK(s.next_flush_id == 3);
}

TEST_CASE("an ack before a reconnect is not made durable by a flush on the new connection") {
  // The issue: the server acknowledged blocks 1 and 2 and was killed before a
  // flush completed; the flush to the restarted server covers only block 3.
  const JournalSummary s = replay_run({
      {kAck, 1, 1},
      {kAck, 2, 1},
      {kFlushIssued, 1},    // in flight when the server died
      {kWriteFailed, 3, 1},  // lost with the connection
      {kConnect, 2},
      {kAck, 3, 1},  // the retry
      {kFlushIssued, 2},
      {kFlushDone, 2},
  });
  CHECK(s.connections == 2);
  CHECK((s.blocks.at(1).acked == 1 && s.blocks.at(1).durable == 0));
  CHECK((s.blocks.at(2).acked == 1 && s.blocks.at(2).durable == 0));
  CHECK((s.blocks.at(3).acked == 1 && s.blocks.at(3).durable == 1));
}

TEST_CASE("a flush covers the acks of its own connection") {
  const JournalSummary s = replay_run({
      {kAck, 1, 1},
      {kFlushIssued, 1},
      {kAck, 2, 1},  // while the flush was in flight
      {kFlushDone, 1},
      {kAck, 3, 1},  // after it, then the connection was lost
      {kConnect, 2},
      {kAck, 4, 1},
      {kFlushIssued, 2},
      {kFlushDone, 2},
      {kAck, 5, 1},
  });
  CHECK(s.blocks.at(1).durable == 1);
  CHECK(s.blocks.at(2).durable == 0);
  CHECK(s.blocks.at(3).durable == 0);
  CHECK(s.blocks.at(4).durable == 1);
  CHECK(s.blocks.at(5).durable == 0);
}

TEST_CASE("ACK_FUA is durable whatever follows") {
  // Block 1: generation 1 with FUA, generation 2 without, then the server died.
  const JournalSummary s = replay_run({
      {kAckFua, 1, 1},
      {kAck, 1, 2},
      {kAckFua, 2, 1},
      {kFlushIssued, 1},  // never completes
      {kConnect, 2},
      {kFlushIssued, 2},
      {kFlushDone, 2},
  });
  CHECK((s.blocks.at(1).acked == 2 && s.blocks.at(1).durable == 1));
  CHECK((s.blocks.at(2).acked == 1 && s.blocks.at(2).durable == 1));
}

TEST_CASE("a switch makes the old server's acks durable only if its flush completed") {
  const JournalSummary s = replay_run({
      {kAck, 1, 1},
      {kFlushIssued, 1},  // the flush before the first switch: completed
      {kFlushDone, 1},
      {kConnect, 2},
      {kSwitch, 1},
      {kAck, 2, 1},
      {kFlushIssued, 2},  // the flush before the second switch: failed
      {kConnect, 3},
      {kSwitch, 2},
      {kAck, 3, 1},
      {kFlushIssued, 3},
      {kFlushDone, 3},
  });
  CHECK(s.switches == 2);
  CHECK(s.connections == 3);
  CHECK(s.blocks.at(1).durable == 1);
  CHECK((s.blocks.at(2).acked == 1 && s.blocks.at(2).durable == 0));
  CHECK(s.blocks.at(3).durable == 1);
}

TEST_CASE("a flush completion recorded on another connection than its issue covers nothing") {
  const JournalSummary s = replay_run({
      {kAck, 1, 1},
      {kFlushIssued, 1},
      {kConnect, 2},
      {kFlushDone, 1},
  });
  CHECK(s.blocks.at(1).durable == 0);
}

TEST_CASE("a version-1 journal is refused with the reason") {
  TempPath p;
  {
    auto w = JournalWriter::create(p.path, JournalHeader{4096, 1, 1 << 20, 0});
    REQUIRE(w);
  }
  {
    std::fstream f(p.path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(8);
    f.put('\x01');
  }
  auto s = read_journal(p.path);
  REQUIRE_FALSE(s);
  CHECK(s.status().message().find("has version 1, which does not record connections") != std::string::npos);
}

TEST_CASE("a torn journal tail is ignored and cut off when appending") {
  TempPath p;
  {
    auto w = JournalWriter::create(p.path, JournalHeader{4096, 1, 1 << 20, 0});
    REQUIRE(w);
    (*w)->add(RecordType::kAck, 1, 1);
    REQUIRE((*w)->sync());
  }
  { std::ofstream(p.path, std::ios::app) << "0123456789"; }
  auto s = read_journal(p.path);
  REQUIRE(s);
  CHECK(s->torn_tail_bytes == 10);
  CHECK(s->blocks.at(1).acked == 1);
  {
    auto w = JournalWriter::open_append(p.path, *s);
    REQUIRE(w);
    (*w)->add(RecordType::kAck, 1, 2);
    REQUIRE((*w)->sync());
  }
  auto s2 = read_journal(p.path);
  REQUIRE(s2);
  CHECK(s2->torn_tail_bytes == 0);
  CHECK(s2->blocks.at(1).acked == 2);
}

TEST_CASE("a bad record followed by good ones is a corrupt journal") {
  TempPath p;
  {
    auto w = JournalWriter::create(p.path, JournalHeader{4096, 1, 1 << 20, 0});
    REQUIRE(w);
    for (int i = 1; i <= 3; ++i) (*w)->add(RecordType::kAck, 1, i);
    REQUIRE((*w)->sync());
  }
  {
    std::fstream f(p.path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(kJournalHeaderSize + kJournalRecordSize + 9);
    f.put('\x55');
  }
  auto s = read_journal(p.path);
  REQUIRE_FALSE(s);
  CHECK(s.status().message().find("corrupt") != std::string::npos);
}

TEST_CASE("a file that is not a journal is refused") {
  TempPath p;
  { std::ofstream(p.path) << std::string(100, 'x'); }
  auto s = read_journal(p.path);
  REQUIRE_FALSE(s);
  CHECK(s.status().message().find("not an lm-workload journal") != std::string::npos);
}

TEST_CASE("sizes, regions and patterns parse or fail with a reason") {
  CHECK(parse_size("4096") == 4096u);
  CHECK(parse_size("64K") == 65536u);
  CHECK(parse_size("256M") == 256u << 20);
  CHECK(parse_size("2GiB") == 2ull << 30);
  CHECK_FALSE(parse_size("12Q"));
  CHECK_FALSE(parse_size("-1"));

  auto r = resolve_range(std::nullopt, "1M:2M", 4096, 64 << 20);
  REQUIRE(r);
  CHECK((r->first == 256 && r->count == 512));
  CHECK_FALSE(resolve_range(std::nullopt, "100:4096", 4096, 64 << 20));
  CHECK_FALSE(resolve_range(std::nullopt, "63M:2M", 4096, 64 << 20));
  CHECK_FALSE(resolve_range(uint64_t{20000}, "", 4096, 64 << 20));
  auto whole = resolve_range(std::nullopt, "", 4096, (64 << 20) + 100);
  REQUIRE(whole);
  CHECK(whole->count == 16384);

  auto hot = parse_pattern("hot:0.25:0.9");
  REQUIRE(hot);
  CHECK(hot->kind == Pattern::Kind::kHot);
  CHECK(hot->hot_fraction == 0.25);
  CHECK_FALSE(parse_pattern("hot:0:0.5"));
  CHECK_FALSE(parse_pattern("hot:0.5"));
  CHECK_FALSE(parse_pattern("zigzag"));
}

TEST_CASE("latency percentiles are within the histogram's resolution") {
  LatencyHistogram h;
  for (uint64_t i = 1; i <= 10000; ++i) h.record(i * 1000);  // 1 us .. 10 ms
  CHECK(h.count() == 10000);
  CHECK(h.percentile(0.5) == Approx(5'000'000).epsilon(0.02));
  CHECK(h.percentile(0.99) == Approx(9'900'000).epsilon(0.02));
  CHECK(h.max() == 10'000'000);
}
