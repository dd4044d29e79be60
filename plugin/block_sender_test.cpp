#include "plugin/block_sender.h"

#include <fcntl.h>
#include <linux/falloc.h>
#include <stdlib.h>
#include <unistd.h>

#include <condition_variable>
#include <fstream>
#include <cstring>
#include <mutex>
#include <vector>

#include <catch2/catch.hpp>

#include "common/byte_order.h"
#include "tests/support/link_pair.h"
#include "tests/support/temp_dir.h"

using namespace livemig;
using namespace std::chrono_literals;

namespace {

constexpr uint64_t kBlock = 4096;

// An image of `blocks` blocks: data where `pattern(b)` is nonzero, a hole
// or written zeros elsewhere, as `layout` says ('d' data, 'h' hole, 'z' zeros).
struct Image {
  TempDir dir;
  std::string path;
  std::optional<ImageFile> file;
  explicit Image(const std::string& layout) {
    path = dir / "img";
    int fd = ::open(path.c_str(), O_CREAT | O_RDWR, 0600);
    REQUIRE(fd >= 0);
    REQUIRE(ftruncate(fd, layout.size() * kBlock) == 0);
    std::vector<char> buf(kBlock);
    for (size_t b = 0; b < layout.size(); ++b) {
      if (layout[b] == 'h') continue;
      std::memset(buf.data(), layout[b] == 'd' ? int('A' + b % 26) : 0, kBlock);
      REQUIRE(pwrite(fd, buf.data(), kBlock, b * kBlock) == static_cast<ssize_t>(kBlock));
    }
    ::close(fd);
    auto f = ImageFile::open(path, false);
    REQUIRE(f);
    file.emplace(std::move(*f));
  }
};

struct Received {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<DataPayload> frames;
  std::vector<std::vector<uint8_t>> bytes;
  void add(const DataPayload& d) {
    std::lock_guard lock(mu);
    frames.push_back(d);
    bytes.emplace_back(d.bytes.begin(), d.bytes.end());
    frames.back().bytes = {};
    cv.notify_all();
  }
  bool wait_for(size_t n) {
    std::unique_lock lock(mu);
    return cv.wait_for(lock, 5s, [&] { return frames.size() >= n; });
  }
};

Secret key() { return Secret::from_bytes("0123456789abcdef-sender").value(); }

// A sender over `img` (its blocks in segments of 64) and a link whose far
// end collects the DATA frames and their request ids, in arrival order
// (priority frames overtake queued ones).
struct Rig {
  SegmentGeometry g;
  EngineStats stats;
  BlockSender sender;
  LinkPair pair{key(), key()};
  Received got;
  std::vector<uint64_t> ids;  // guarded by got.mu
  Rig(Image& img, uint64_t blocks)
      : g(SegmentGeometry::make(blocks * kBlock, kBlock, 64 * kBlock).value()), sender(*img.file, g, stats) {
    pair.server->start([this](auto&, PeerLink::Frame& f) {
      if (auto* d = std::get_if<DataPayload>(&f.message)) {
        {
          std::lock_guard lock(got.mu);
          ids.push_back(f.header.request_id);
        }
        got.add(*d);
      }
    }, [](auto&, auto&) {});
  }
};

}  // namespace

TEST_CASE("block sender: holes and zero blocks cross as zero notes, data as frames of at most 256 KiB") {
  // 2 data blocks, a hole of 3, 2 written-zero blocks, then 80 data blocks (320 KiB).
  std::string layout = "ddhhhzz" + std::string(80, 'd');
  Image img(layout);
  Rig rig(img, layout.size());
  auto& [g, stats, sender, pair, got, ids] = rig;
  auto sent = sender.send_blocks(*pair.client, {0, layout.size()}, 0, false);
  REQUIRE(sent);
  CHECK(sent->data_blocks == 82);
  REQUIRE(got.wait_for(sent->frames));
  uint64_t data_bytes = 0, zero_blocks = 0, covered = 0;
  for (size_t i = 0; i < got.frames.size(); ++i) {
    const DataPayload& d = got.frames[i];
    CHECK(d.offset == covered);  // in order, no gap, no overlap
    covered += d.length;
    CHECK(d.length <= kMaxFrameData);
    if (d.flags & kFlagZero) {
      zero_blocks += d.length / kBlock;
      for (uint64_t o = d.offset; o < d.offset + d.length; o += kBlock) CHECK(layout[o / kBlock] != 'd');
    } else {
      data_bytes += d.length;
      for (uint64_t o = 0; o < d.length; o += kBlock) CHECK(got.bytes[i][o] == char('A' + (d.offset + o) / kBlock % 26));
    }
  }
  CHECK(covered == layout.size() * kBlock);
  CHECK(zero_blocks == 5);
  CHECK(data_bytes == 82 * kBlock);
  CHECK(stats.zero_blocks_sent == 5);
}

TEST_CASE("block sender: a pull outside the image or over the frame limit is a BadFrame, not a read") {
  Image img("dddd");
  auto g = SegmentGeometry::make(4 * kBlock, kBlock, 4 * kBlock).value();
  EngineStats stats;
  BlockSender sender(*img.file, g, stats);
  LinkPair pair(key(), key());
  Status past = sender.answer_pull(*pair.client, 1, PullPayload{3 * kBlock, 2 * kBlock, 1});
  CHECK(error_code_of(past) == ErrorCode::BadFrame);
  Status huge = sender.answer_pull(*pair.client, 2, PullPayload{0, kMaxDataLength + 1, 1});
  CHECK(error_code_of(huge) == ErrorCode::BadFrame);
  Status empty = sender.answer_pull(*pair.client, 3, PullPayload{0, 0, 1});
  CHECK(error_code_of(empty) == ErrorCode::BadFrame);
  CHECK(stats.payload_bytes_sent == 0);
}

TEST_CASE("block sender: checksums per unit match a hash of the same bytes, the last unit cut at the end") {
  Image img("ddhdd");  // 5 blocks: units of 2 blocks -> 3 units, the last one block
  auto g = SegmentGeometry::make(5 * kBlock, kBlock, 8 * kBlock).value();
  EngineStats stats;
  BlockSender sender(*img.file, g, stats);
  auto reply = sender.sums(SumsPayload{0, 2 * kBlock, 10});
  REQUIRE(reply);
  REQUIRE(reply->hashes.size() == 3);
  CHECK(reply->hashes[0] == sender.hash_range(0, 2 * kBlock).value());
  CHECK(reply->hashes[2] == sender.hash_range(4 * kBlock, kBlock).value());
  CHECK(reply->hashes[0] != reply->hashes[1]);
  CHECK_FALSE(sender.sums(SumsPayload{6 * kBlock, kBlock, 1}));  // beyond the image
}

TEST_CASE("block sender: with compression, background data crosses compressed and priority data plain") {
  std::string layout(80, 'd');  // 320 KiB of blocks each one repeated byte: very compressible
  Image img(layout);
  Rig rig(img, layout.size());
  auto& [g, stats, sender, pair, got, ids] = rig;
  CompressionGovernor always(Compression{Compression::Kind::Zstd, 1}, 0);
  auto background = sender.send_blocks(*pair.client, {0, layout.size()}, 0, false, {&always});
  REQUIRE(background);
  auto priority = sender.send_blocks(*pair.client, {0, layout.size()}, 7, true, {&always});
  REQUIRE(priority);
  REQUIRE(got.wait_for(background->frames + priority->frames));
  uint64_t compressed = 0;
  for (size_t i = 0; i < got.frames.size(); ++i) {
    DataPayload d = got.frames[i];
    d.bytes = got.bytes[i];
    const bool is_priority = ids[i] == 7;
    CHECK(bool(d.flags & kFlagCompressed) == !is_priority);
    std::string plain;
    if (d.flags & kFlagCompressed) {
      REQUIRE(decompress_frame(d, plain));
      compressed += d.bytes.size();
    } else {
      plain.assign(d.bytes.begin(), d.bytes.end());
    }
    REQUIRE(plain.size() == d.length);
    for (uint64_t o = 0; o < d.length; o += kBlock) CHECK(plain[o] == char('A' + (d.offset + o) / kBlock % 26));
  }
  CHECK(stats.compressed_frames == background->frames);
  CHECK(stats.compressed_plain_bytes == layout.size() * kBlock);
  CHECK(stats.compressed_wire_bytes == compressed);
  CHECK(compressed * 20 < layout.size() * kBlock);
}

TEST_CASE("block sender: with a base, blocks equal to it cross as notes and the rest as data") {
  // Image blocks: 'A'+b%26 (Image's pattern); the base holds the same bytes
  // for blocks 0-9 and 20-29 only.
  std::string layout(40, 'd');
  Image img(layout);
  std::string base_path = img.dir / "base.img";
  {
    std::ofstream f(base_path, std::ios::binary);
    for (uint64_t b = 0; b < 40; ++b) f << std::string(kBlock, (b / 10) % 2 == 0 ? char('A' + b % 26) : '#');
  }
  auto base = BaseImage::open(base_path, kBlock, [](const std::string&) {});
  REQUIRE(base);
  Rig rig(img, layout.size());
  auto& [g, stats, sender, pair, got, ids] = rig;
  auto sent = sender.send_blocks(*pair.client, {0, 40}, 0, false, {nullptr, base->get()});
  REQUIRE(sent);
  REQUIRE(got.wait_for(sent->frames));
  uint64_t noted = 0, plain = 0;
  for (size_t i = 0; i < got.frames.size(); ++i) {
    const DataPayload& d = got.frames[i];
    const uint64_t first = d.offset / kBlock, n = d.length / kBlock;
    if (d.flags & kFlagBase) {
      noted += n;
      REQUIRE(got.bytes[i].size() == n * 8);
      for (uint64_t b = first; b < first + n; ++b) {
        CHECK((b / 10) % 2 == 0);
        CHECK(load_be64(got.bytes[i].data() + (b - first) * 8) == (*base)->block_hash(b));
      }
    } else {
      plain += n;
      for (uint64_t b = first; b < first + n; ++b) CHECK((b / 10) % 2 == 1);
    }
  }
  CHECK(noted == 20);
  CHECK(plain == 20);
  CHECK(stats.base_blocks_sent == 20);
  CHECK(sent->data_blocks == 20);  // notes are not data
  // A demand read (priority) never gets notes.
  auto demand = sender.send_blocks(*pair.client, {0, 10}, 9, true, {nullptr, base->get()});
  REQUIRE(demand);
  CHECK(demand->data_blocks == 10);
}

TEST_CASE("block sender: the image's partial last block crosses as data, never as a note, whatever the base") {
  // 2 blocks and 100 bytes; the base: 3 whole blocks whose bytes start as the image's.
  TempDir dir;
  std::string image_path = dir / "img", base_path = dir / "base.img";
  std::string bytes = std::string(kBlock, 'a') + std::string(kBlock, 'b') + std::string(100, 'c');
  { std::ofstream(image_path, std::ios::binary) << bytes; }
  { std::ofstream(base_path, std::ios::binary) << bytes << std::string(kBlock - 100, '\0'); }
  auto file = ImageFile::open(image_path, false);
  REQUIRE(file);
  auto base = BaseImage::open(base_path, kBlock, [](const std::string&) {});
  REQUIRE(base);
  REQUIRE((*base)->full_blocks() == 3);
  auto g = SegmentGeometry::make(bytes.size(), kBlock, 64 * kBlock).value();
  EngineStats stats;
  BlockSender sender(*file, g, stats);
  LinkPair pair(key(), key());
  Received got;
  pair.server->start([&](auto&, PeerLink::Frame& f) {
    if (auto* d = std::get_if<DataPayload>(&f.message)) got.add(*d);
  }, [](auto&, auto&) {});
  auto sent = sender.send_blocks(*pair.client, {0, 3}, 0, false, {nullptr, base->get()});
  REQUIRE(sent);
  REQUIRE(got.wait_for(sent->frames));
  CHECK(stats.base_blocks_sent == 2);
  CHECK(sent->data_blocks == 1);
  const DataPayload& last = got.frames.back();
  CHECK(last.offset == 2 * kBlock);
  CHECK(last.length == 100);
  CHECK(last.flags == 0);
}

TEST_CASE("block sender: hole_blocks_at counts the hole from a range's start, 0 where data starts it") {
  Image img("hhhhhhhhddhhhh");
  Rig rig(img, 14);
  CHECK(rig.sender.hole_blocks_at({0, 14}) == 8);
  CHECK(rig.sender.hole_blocks_at({0, 5}) == 5);
  CHECK(rig.sender.hole_blocks_at({3, 9}) == 5);
  CHECK(rig.sender.hole_blocks_at({8, 14}) == 0);
  CHECK(rig.sender.hole_blocks_at({9, 14}) == 0);
  CHECK(rig.sender.hole_blocks_at({10, 14}) == 4);
}
