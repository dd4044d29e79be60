#include "common/state_file.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include <catch2/catch.hpp>

#include "tests/support/strings.h"
#include "tests/support/temp_dir.h"

using livemig::BlockBitmap;
using livemig::IndexRange;
using livemig::MigrationRecord;
using livemig::StateFile;
using livemig::Status;

using livemig::contains;
using livemig::TempDir;

namespace {


MigrationRecord sample_record(uint64_t blocks = 3 * StateFile::kBlocksPerPage + 100) {
  MigrationRecord r;
  r.migration_id = "m-0001";
  r.role = "destination";
  r.phase = "PreCopy";
  r.peer = "10.0.0.1:10809";
  r.mode = "livefs";
  r.block_size = 4096;
  r.image_size = blocks * r.block_size - 123;  // a partial last block
  r.extra = {{"threshold", 0.25}, {"segments", {1, 2, 3}}};
  return r;
}

std::unique_ptr<StateFile> must_create(const std::string& path, const MigrationRecord& r) {
  auto sf = StateFile::create(path, r);
  INFO((sf.is_ok() ? std::string() : sf.status().message()));
  REQUIRE(sf.is_ok());
  return std::move(*sf);
}

std::unique_ptr<StateFile> must_open(const std::string& path) {
  auto sf = StateFile::open(path);
  INFO((sf.is_ok() ? std::string() : sf.status().message()));
  REQUIRE(sf.is_ok());
  return std::move(*sf);
}

std::string read_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), {});
}

void flip_byte(const std::string& path, uint64_t offset) {
  int fd = ::open(path.c_str(), O_RDWR);
  REQUIRE(fd >= 0);
  unsigned char c = 0;
  REQUIRE(::pread(fd, &c, 1, static_cast<off_t>(offset)) == 1);
  c ^= 0x40;
  REQUIRE(::pwrite(fd, &c, 1, static_cast<off_t>(offset)) == 1);
  ::close(fd);
}

uint64_t slot_generation(const std::string& bytes, int slot) {
  uint64_t g = 0;
  for (int i = 7; i >= 0; --i) g = (g << 8) | static_cast<unsigned char>(bytes[slot * StateFile::kSlotSize + 8 + i]);
  return g;
}

// The blocks a test marks in batch i (several pages, some runs, some singles).
std::vector<IndexRange> batch(uint64_t i, uint64_t blocks) {
  std::mt19937_64 rng(i * 7919 + 1);
  std::vector<IndexRange> out;
  for (int k = 0; k < 8; ++k) {
    uint64_t first = rng() % blocks;
    uint64_t len = 1 + rng() % (k % 2 ? 1 : 300);
    out.push_back({first, std::min(blocks, first + len)});
  }
  return out;
}

}  // namespace

TEST_CASE("the state file belongs beside its image", "[state]") {
  CHECK(StateFile::path_for_image("/var/lib/vm.img") == "/var/lib/vm.img.livemig-state");
}

TEST_CASE("a created state file opens with the same record and bitmap", "[state]") {
  TempDir dir;
  std::string path = dir / "vm.img.livemig-state";
  MigrationRecord r = sample_record();
  uint64_t blocks = 3 * StateFile::kBlocksPerPage + 100;
  {
    auto sf = must_create(path, r);
    CHECK(sf->record() == r);
    CHECK(sf->generation() == 1);
    REQUIRE(sf->block_count() == blocks);
    CHECK(sf->present().count() == 0);
    sf->mark_present({0, 1});
    sf->mark_present({StateFile::kBlocksPerPage - 3, StateFile::kBlocksPerPage + 5});  // straddles pages 0/1
    sf->mark_present({blocks - 1, blocks});                                             // last, partial block
    sf->mark_present({2 * StateFile::kBlocksPerPage + 64, 2 * StateFile::kBlocksPerPage + 128});
    REQUIRE(sf->sync().is_ok());
  }
  // The file is exactly two slots and the bitmap.
  CHECK(std::filesystem::file_size(path) == StateFile::kBitmapOffset + (blocks + 63) / 64 * 8);

  auto sf = must_open(path);
  CHECK(sf->record() == r);
  CHECK(sf->record().extra["threshold"] == 0.25);
  CHECK(sf->generation() == 1);
  CHECK(sf->present().count() == 1 + 8 + 1 + 64);
  CHECK(sf->present().test(0));
  CHECK(sf->present().all_set({StateFile::kBlocksPerPage - 3, StateFile::kBlocksPerPage + 5}));
  CHECK(sf->present().test(blocks - 1));
  CHECK(sf->present().all_set({2 * StateFile::kBlocksPerPage + 64, 2 * StateFile::kBlocksPerPage + 128}));
  CHECK_FALSE(sf->present().test(1));
}

TEST_CASE("blocks marked missing after a sync read as missing once synced again", "[state]") {
  TempDir dir;
  std::string path = dir / "vm.img.livemig-state";
  MigrationRecord r = sample_record();
  const uint64_t page = StateFile::kBlocksPerPage;
  {
    auto sf = must_create(path, r);
    sf->mark_present({0, 3 * page});
    REQUIRE(sf->sync().is_ok());
    sf->mark_missing({page - 2, page + 2});  // straddles pages 0/1
    sf->mark_missing({2 * page + 7, 2 * page + 8});
    REQUIRE(sf->sync().is_ok());
  }
  auto sf = must_open(path);
  CHECK(sf->present().count() == 3 * page - 5);
  CHECK(sf->present().none_set({page - 2, page + 2}));
  CHECK_FALSE(sf->present().test(2 * page + 7));
  CHECK(sf->present().test(page - 3));
  CHECK(sf->present().test(page + 2));
  CHECK(sf->present().test(2 * page + 8));
}

TEST_CASE("the on-disk bitmap is BlockBitmap::serialize()'s layout", "[state]") {
  TempDir dir;
  std::string path = dir / "s";
  MigrationRecord r = sample_record(1000);
  BlockBitmap expected(1000);
  {
    auto sf = must_create(path, r);
    for (uint64_t b : {0, 5, 63, 64, 500, 999}) {
      sf->mark_present({b, b + 1});
      expected.set(b);
    }
    REQUIRE(sf->sync().is_ok());
  }
  CHECK(read_file(path).substr(StateFile::kBitmapOffset) == expected.serialize());
}

TEST_CASE("write_record alternates slots and the newest record wins", "[state]") {
  TempDir dir;
  std::string path = dir / "s";
  MigrationRecord r = sample_record();
  auto sf = must_create(path, r);
  std::string bytes = read_file(path);
  CHECK(slot_generation(bytes, 0) == 1);
  CHECK(bytes.substr(StateFile::kSlotSize, 8) != "LMSTATE1");  // slot B starts invalid

  r.phase = "Sync";
  REQUIRE(sf->write_record(r).is_ok());
  CHECK(sf->generation() == 2);
  bytes = read_file(path);
  CHECK(slot_generation(bytes, 0) == 1);
  CHECK(slot_generation(bytes, 1) == 2);

  r.phase = "Handover";
  REQUIRE(sf->write_record(r).is_ok());
  bytes = read_file(path);
  CHECK(slot_generation(bytes, 0) == 3);
  CHECK(slot_generation(bytes, 1) == 2);

  r.phase = "PostCopy";
  r.extra["pulled"] = 12345;
  REQUIRE(sf->write_record(r).is_ok());
  bytes = read_file(path);
  CHECK(slot_generation(bytes, 0) == 3);
  CHECK(slot_generation(bytes, 1) == 4);
  CHECK(sf->record() == r);

  sf.reset();
  auto again = must_open(path);
  CHECK(again->record() == r);
  CHECK(again->generation() == 4);
  // Writing after a reopen still goes to the slot not holding the newest.
  r.phase = "Done";
  REQUIRE(again->write_record(r).is_ok());
  CHECK(slot_generation(read_file(path), 0) == 5);
}

TEST_CASE("a corrupt newest slot falls back to the older record", "[state]") {
  TempDir dir;
  std::string path = dir / "s";
  MigrationRecord r = sample_record();
  MigrationRecord older = r;
  {
    auto sf = must_create(path, r);
    r.phase = "Sync";
    older = r;
    REQUIRE(sf->write_record(r).is_ok());  // generation 2 in slot B
    r.phase = "Handover";
    REQUIRE(sf->write_record(r).is_ok());  // generation 3 in slot A
  }
  SECTION("a flipped byte in the JSON") { flip_byte(path, StateFile::kSlotHeaderSize + 10); }
  SECTION("a flipped byte in the generation") { flip_byte(path, 8); }
  SECTION("a torn write: the slot's second half is zeros") {
    int fd = ::open(path.c_str(), O_RDWR);
    REQUIRE(fd >= 0);
    std::string zeros(StateFile::kSlotSize - 40, '\0');
    REQUIRE(::pwrite(fd, zeros.data(), zeros.size(), 40) == static_cast<ssize_t>(zeros.size()));
    ::close(fd);
  }
  auto sf = must_open(path);
  CHECK(sf->record() == older);
  CHECK(sf->generation() == 2);
  // The next write replaces the corrupt slot, not the good one.
  r.phase = "PostCopy";
  REQUIRE(sf->write_record(r).is_ok());
  sf.reset();
  auto again = must_open(path);
  CHECK(again->record().phase == "PostCopy");
  CHECK(again->generation() == 3);
}

TEST_CASE("a state file with both slots corrupt is refused with a clear error", "[state]") {
  TempDir dir;
  std::string path = dir / "s";
  {
    auto sf = must_create(path, sample_record());
    REQUIRE(sf->write_record(sample_record()).is_ok());
  }
  flip_byte(path, StateFile::kSlotHeaderSize + 3);
  flip_byte(path, StateFile::kSlotSize + 0);  // slot B's magic
  auto sf = StateFile::open(path);
  REQUIRE_FALSE(sf.is_ok());
  const std::string& m = sf.status().message();
  CHECK(contains(m, path));
  CHECK(contains(m, "no valid header"));
  CHECK(contains(m, "slot A: CRC mismatch"));
  CHECK(contains(m, "slot B: bad magic"));
}

TEST_CASE("a state file whose bitmap length does not match its record is refused", "[state]") {
  TempDir dir;
  std::string path = dir / "s";
  uint64_t blocks = 3 * StateFile::kBlocksPerPage + 100;
  uint64_t want = (blocks + 63) / 64 * 8;
  { must_create(path, sample_record(blocks)); }

  SECTION("truncated") {
    std::filesystem::resize_file(path, StateFile::kBitmapOffset + want - 8);
    auto sf = StateFile::open(path);
    REQUIRE_FALSE(sf.is_ok());
    const std::string& m = sf.status().message();
    CHECK(contains(m, path));
    CHECK(contains(m, "truncated bitmap"));
    CHECK(contains(m, std::to_string(want - 8) + " bytes"));
    CHECK(contains(m, std::to_string(blocks) + " blocks"));
    CHECK(contains(m, "need " + std::to_string(want)));
  }
  SECTION("too long") {
    std::filesystem::resize_file(path, StateFile::kBitmapOffset + want + 4096);
    auto sf = StateFile::open(path);
    REQUIRE_FALSE(sf.is_ok());
    const std::string& m = sf.status().message();
    CHECK(contains(m, path));
    CHECK(contains(m, "bitmap size mismatch"));
    CHECK(contains(m, std::to_string(want + 4096) + " bytes"));
  }
  SECTION("no bitmap at all") {
    std::filesystem::resize_file(path, StateFile::kBitmapOffset);
    auto sf = StateFile::open(path);
    REQUIRE_FALSE(sf.is_ok());
    CHECK(contains(sf.status().message(), "truncated bitmap: 0 bytes"));
  }
  SECTION("shorter than the header") {
    std::filesystem::resize_file(path, 100);
    auto sf = StateFile::open(path);
    REQUIRE_FALSE(sf.is_ok());
    CHECK(contains(sf.status().message(), "no valid header"));
  }
}

TEST_CASE("state file misuse and I/O errors name the path", "[state]") {
  TempDir dir;
  std::string path = dir / "s";

  SECTION("opening a missing file") {
    auto sf = StateFile::open(path);
    REQUIRE_FALSE(sf.is_ok());
    CHECK(contains(sf.status().message(), path));
    CHECK(sf.status().errno_value() == ENOENT);
  }
  SECTION("a record with a bad role or block size") {
    MigrationRecord r = sample_record();
    r.role = "sideways";
    auto sf = StateFile::create(path, r);
    REQUIRE_FALSE(sf.is_ok());
    CHECK(contains(sf.status().message(), "role"));
    r.role = "source";
    r.block_size = 3000;
    sf = StateFile::create(path, r);
    REQUIRE_FALSE(sf.is_ok());
    CHECK(contains(sf.status().message(), "power of two"));
    CHECK_FALSE(std::filesystem::exists(path));
    // fuzz_state_file: 2^64 - 1 one-byte blocks made the bitmap 0 bytes.
    r.block_size = 1;
    r.image_size = UINT64_MAX;
    sf = StateFile::create(path, r);
    REQUIRE_FALSE(sf.is_ok());
    CHECK(contains(sf.status().message(), "image_size"));
    CHECK_FALSE(std::filesystem::exists(path));
  }
  SECTION("a record too large for a slot") {
    auto sf = must_create(path, sample_record());
    MigrationRecord r = sample_record();
    r.extra["blob"] = std::string(5000, 'x');
    Status st = sf->write_record(r);
    REQUIRE_FALSE(st.is_ok());
    CHECK(contains(st.message(), "at most"));
    CHECK(sf->record() == sample_record());  // unchanged
    CHECK(sf->generation() == 1);
  }
  SECTION("changing the geometry") {
    auto sf = must_create(path, sample_record());
    MigrationRecord r = sample_record();
    r.image_size += 4096;
    CHECK_FALSE(sf->write_record(r).is_ok());
  }
  SECTION("a second StateFile on the same file") {
    auto sf = must_create(path, sample_record());
    auto second = StateFile::open(path);
    REQUIRE_FALSE(second.is_ok());
    CHECK(contains(second.status().message(), "in use"));
    sf.reset();
    CHECK(StateFile::open(path).is_ok());
  }
  SECTION("create over a file a StateFile still holds replaces it") {
    auto old = must_create(path, sample_record());
    MigrationRecord r = sample_record();
    r.migration_id = "m-0002";
    auto replaced = must_create(path, r);
    auto second = StateFile::open(path);  // the new file is locked by `replaced`
    REQUIRE_FALSE(second.is_ok());
    CHECK(contains(second.status().message(), "in use"));
    old.reset();
    replaced.reset();
    CHECK(must_open(path)->record().migration_id == "m-0002");
  }
  SECTION("invalid UTF-8 in the record") {
    MigrationRecord r = sample_record();
    r.peer = "\xff\xfe";
    auto sf = StateFile::create(path, r);
    REQUIRE_FALSE(sf.is_ok());
    CHECK(contains(sf.status().message(), path));
  }
}

TEST_CASE("create replaces an old state file and remove deletes it", "[state]") {
  TempDir dir;
  std::string path = dir / "s";
  {
    auto sf = must_create(path, sample_record());
    sf->mark_present({0, 100});
    REQUIRE(sf->sync().is_ok());
  }
  MigrationRecord r = sample_record(10);
  r.migration_id = "m-0002";
  {
    auto sf = must_create(path, r);
    CHECK(sf->present().count() == 0);
  }
  auto sf = must_open(path);
  CHECK(sf->record().migration_id == "m-0002");
  CHECK(sf->present().count() == 0);
  CHECK_FALSE(std::filesystem::exists(path + ".tmp"));
  sf.reset();

  REQUIRE(StateFile::remove(path).is_ok());
  CHECK_FALSE(std::filesystem::exists(path));
  CHECK(StateFile::remove(path).is_ok());  // already gone
}

TEST_CASE("an empty image has an empty bitmap", "[state]") {
  TempDir dir;
  std::string path = dir / "s";
  MigrationRecord r = sample_record();
  r.image_size = 0;
  {
    auto sf = must_create(path, r);
    CHECK(sf->block_count() == 0);
    sf->mark_present({0, 0});
    CHECK(sf->sync().is_ok());
  }
  auto sf = must_open(path);
  CHECK(sf->block_count() == 0);
}

TEST_CASE("marks from many threads with concurrent syncs are all durable", "[state]") {
  TempDir dir;
  std::string path = dir / "s";
  const uint64_t blocks = 5 * StateFile::kBlocksPerPage + 777;
  auto sf = must_create(path, sample_record(blocks));
  // A second descriptor that reads what sync() wrote, as another process would.
  int rfd = ::open(path.c_str(), O_RDONLY);
  REQUIRE(rfd >= 0);
  auto on_disk = [&](uint64_t block) {
    unsigned char c = 0;
    if (::pread(rfd, &c, 1, static_cast<off_t>(StateFile::kBitmapOffset + block / 8)) != 1) return false;
    return ((c >> (block % 8)) & 1) != 0;
  };

  constexpr int kThreads = 4;
  constexpr int kBatches = 200;
  std::vector<std::vector<IndexRange>> marked(kThreads);
  std::vector<int> failures(kThreads, 0);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      for (int i = 0; i < kBatches; ++i) {
        auto ranges = batch(static_cast<uint64_t>(t) * 100000 + i, blocks);
        for (IndexRange r : ranges) sf->mark_present(r);
        marked[t].insert(marked[t].end(), ranges.begin(), ranges.end());
        if (i % 3 == 0) {
          // After sync() returns, this thread's marks are in the file.
          if (!sf->sync().is_ok()) ++failures[t];
          for (IndexRange r : ranges)
            if (!on_disk(r.first) || !on_disk(r.last - 1)) ++failures[t];
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  ::close(rfd);
  for (int t = 0; t < kThreads; ++t) CHECK(failures[t] == 0);
  REQUIRE(sf->sync().is_ok());

  BlockBitmap expected(blocks);
  for (auto& v : marked)
    for (IndexRange r : v) expected.set_range(r);
  CHECK(sf->present().serialize() == expected.serialize());
  sf.reset();

  auto reopened = must_open(path);
  CHECK(reopened->present().count() == expected.count());
  CHECK(reopened->present().serialize() == expected.serialize());
}

TEST_CASE("marks synced before a crash survive; later marks may be lost", "[state]") {
  TempDir dir;
  std::string path = dir / "s";
  const uint64_t blocks = 4 * StateFile::kBlocksPerPage;
  BlockBitmap first(blocks);
  {
    auto sf = must_create(path, sample_record(blocks));
    for (IndexRange r : batch(1, blocks)) {
      sf->mark_present(r);
      first.set_range(r);
    }
    REQUIRE(sf->sync().is_ok());
    // A second batch, never synced: the process "dies" (the destructor does
    // not sync) before it is durable.
    for (IndexRange r : batch(2, blocks)) sf->mark_present(r);
  }
  auto sf = must_open(path);
  for (uint64_t b = first.find_next_set(0); b < blocks; b = first.find_next_set(b + 1)) {
    INFO("block " << b);
    REQUIRE(sf->present().test(b));
  }
  // Every bit on disk was marked in batch 1 or 2; nothing else appears.
  BlockBitmap either(blocks);
  for (uint64_t i : {1, 2})
    for (IndexRange r : batch(i, blocks)) either.set_range(r);
  for (uint64_t b = sf->present().find_next_set(0); b < blocks; b = sf->present().find_next_set(b + 1))
    REQUIRE(either.test(b));
}

TEST_CASE("a process killed with SIGKILL mid-sync keeps every acknowledged batch", "[state]") {
  TempDir dir;
  std::string path = dir / "s";
  const uint64_t blocks = 6 * StateFile::kBlocksPerPage + 5;
  { must_create(path, sample_record(blocks)); }

  int fds[2];
  REQUIRE(::pipe(fds) == 0);
  pid_t pid = ::fork();
  REQUIRE(pid >= 0);
  if (pid == 0) {
    // Child: mark a batch, sync, acknowledge it; forever, until killed.
    ::close(fds[0]);
    auto sf = StateFile::open(path);
    if (!sf.is_ok()) ::_exit(2);
    for (uint32_t i = 0;; ++i) {
      for (IndexRange r : batch(1000 + i, blocks)) (*sf)->mark_present(r);
      if (!(*sf)->sync().is_ok()) ::_exit(3);
      if (::write(fds[1], &i, sizeof i) != sizeof i) ::_exit(4);
    }
  }
  ::close(fds[1]);
  // Read acknowledgements for a while, then kill the child wherever it is.
  uint32_t acked = 0;
  bool any = false;
  for (int n = 0; n < 60; ++n) {
    uint32_t i;
    if (::read(fds[0], &i, sizeof i) != sizeof i) break;
    acked = i;
    any = true;
  }
  ::kill(pid, SIGKILL);
  int status = 0;
  REQUIRE(::waitpid(pid, &status, 0) == pid);
  ::close(fds[0]);
  REQUIRE(any);
  CHECK(WIFSIGNALED(status));

  auto sf = must_open(path);
  for (uint32_t i = 0; i <= acked; ++i) {
    for (IndexRange r : batch(1000 + i, blocks)) {
      INFO("batch " << i << " blocks [" << r.first << ", " << r.last << ")");
      REQUIRE(sf->present().all_set(r));
    }
  }
}
