#include "plugin/block_sender.h"

#include <xxhash.h>

#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include <fmt/format.h>

#include "common/byte_order.h"
#include "common/transfer_planner.h"
#include "common/uninitialized_buffer.h"

namespace livemig {
namespace {

// [blocks] as alternating runs of holes and (maybe) data, in order, covering
// all of `blocks` (a hole is a whole number of blocks inside a file hole).
std::vector<std::pair<IndexRange, bool>> hole_runs(const ImageFile& image, const SegmentGeometry& g,
                                                   IndexRange blocks) {
  std::vector<std::pair<IndexRange, bool>> parts;  // (blocks, is_hole)
  const uint64_t off = g.range_offset(blocks), len = g.range_length(blocks);
  image.extents(len, off, [&](uint64_t o, uint64_t l, bool hole) {
    IndexRange r = hole ? g.blocks_covered(o, l) : g.blocks_touched(o, l);
    r.first = std::max(r.first, blocks.first);
    r.last = std::min(r.last, blocks.last);
    if (!parts.empty() && parts.back().first.last > r.first) r.first = parts.back().first.last;
    if (r.empty()) return true;
    uint64_t covered = parts.empty() ? blocks.first : parts.back().first.last;
    if (covered < r.first) parts.push_back({{covered, r.first}, false});
    parts.push_back({r, hole});
    return true;
  });
  uint64_t covered = parts.empty() ? blocks.first : parts.back().first.last;
  if (covered < blocks.last) parts.push_back({{covered, blocks.last}, false});
  return parts;
}

Status read_error(uint64_t length, uint64_t offset) {
  return protocol_error(ErrorCode::Internal,
                        fmt::format("reading {} bytes at {}: {}", length, offset, std::strerror(errno)));
}

}  // namespace

void BlockSender::maybe_compress(CompressionGovernor& compression, const PeerLink& link, DataPayload& d,
                                 std::string& buf) {
  using Clock = CompressionGovernor::Clock;
  const Clock::time_point start = Clock::now();
  std::optional<int> level = compression.level_for_next(link.queued_bytes(), link.bytes_sent(), start);
  if (!level) return;
  const bool worth = compress_frame(d.bytes, *level, buf);
  compression.record_try(*level, d.bytes.size(), worth ? buf.size() : 0, Clock::now() - start);
  if (!worth) return;
  d.flags = kFlagCompressed;
  d.bytes = {reinterpret_cast<const uint8_t*>(buf.data()), buf.size()};
  stats_.compressed_frames.fetch_add(1, std::memory_order_relaxed);
  stats_.compressed_plain_bytes.fetch_add(d.length, std::memory_order_relaxed);
  stats_.compressed_wire_bytes.fetch_add(buf.size(), std::memory_order_relaxed);
}

uint64_t BlockSender::hole_blocks_at(IndexRange r) const {
  auto parts = hole_runs(image_, g_, r);
  return !parts.empty() && parts.front().second ? parts.front().first.count() : 0;
}

Result<BlockSender::Sent> BlockSender::send_blocks(PeerLink& link, IndexRange blocks, uint64_t request_id,
                                                   bool priority, const SendEncoding& encoding) {
  Sent sent;
  auto send_zero = [&](IndexRange r) {
    link.send_data(DataPayload{g_.range_offset(r), static_cast<uint32_t>(g_.range_length(r)), kFlagZero, {}},
                   request_id, priority);
    sent.frames++;
    stats_.zero_blocks_sent.fetch_add(r.count(), std::memory_order_relaxed);
  };
  UninitializedBytes bytes;  // the read fills it: no memset of each unit first
  for (auto& [r, hole] : hole_runs(image_, g_, blocks)) {
    if (hole) {
      send_zero(r);
      continue;
    }
    bytes.resize(g_.range_length(r));
    char* buf = reinterpret_cast<char*>(bytes.data());
    if (image_.pread(buf, bytes.size(), g_.range_offset(r)) < 0) return read_error(bytes.size(), g_.range_offset(r));
    for (const ZeroSplit& z : split_zero_runs(g_, r, buf)) {
      if (z.zero)
        send_zero(z.blocks);
      else
        send_data_blocks(link, z.blocks, buf + (g_.range_offset(z.blocks) - g_.range_offset(r)), request_id, priority,
                         encoding, sent);
    }
  }
  return sent;
}

void BlockSender::send_data_blocks(PeerLink& link, IndexRange blocks, const char* data, uint64_t request_id,
                                   bool priority, const SendEncoding& encoding, Sent& sent) {
  const BaseImage* base = priority ? nullptr : encoding.base;
  const uint64_t bs = g_.block_size();
  // Whole blocks only: the image's partial last block (never in a note) has
  // fewer than bs bytes in `data`.
  auto equal_to_base = [&](uint64_t b) {
    return base && b < base->full_blocks() && (b + 1) * bs <= g_.image_size() &&
           block_checksum(data + (b - blocks.first) * bs, bs) == base->block_hash(b);
  };
  std::string sums;
  for (uint64_t b = blocks.first; b < blocks.last;) {
    const bool in_base = equal_to_base(b);
    uint64_t end = b + 1;
    while (end < blocks.last && equal_to_base(end) == in_base) ++end;
    const IndexRange run{b, end};
    const char* run_data = data + (b - blocks.first) * bs;
    if (!in_base) {
      send_frames(link, run, run_data, request_id, priority, encoding.compression, sent);
    } else {
      // A note: the checksum of each block, which the destination checks
      // against what it reads from its own base.
      sums.resize(run.count() * 8);
      for (uint64_t i = 0; i < run.count(); ++i)
        store_be64(reinterpret_cast<uint8_t*>(sums.data()) + i * 8, base->block_hash(run.first + i));
      link.send_data(DataPayload{g_.range_offset(run), static_cast<uint32_t>(g_.range_length(run)), kFlagBase,
                                 {reinterpret_cast<const uint8_t*>(sums.data()), sums.size()}},
                     request_id, priority);
      sent.frames++;
      stats_.base_blocks_sent.fetch_add(run.count(), std::memory_order_relaxed);
    }
    b = end;
  }
}

void BlockSender::send_frames(PeerLink& link, IndexRange blocks, const char* data, uint64_t request_id, bool priority,
                              CompressionGovernor* compression, Sent& sent) {
  std::string compressed;
  for (uint64_t off = g_.range_offset(blocks), end = off + g_.range_length(blocks); off < end;) {
    uint64_t n = std::min<uint64_t>(std::max(kMaxFrameData, g_.block_size()), end - off);
    DataPayload d{off, static_cast<uint32_t>(n), 0,
                  {reinterpret_cast<const uint8_t*>(data + (off - g_.range_offset(blocks))), n}};
    if (compression && !priority) maybe_compress(*compression, link, d, compressed);
    link.send_data(d, request_id, priority);
    sent.frames++;
    stats_.payload_bytes_sent.fetch_add(n, std::memory_order_relaxed);
    off += n;
  }
  stats_.data_blocks_sent.fetch_add(blocks.count(), std::memory_order_relaxed);
  sent.data_blocks += blocks.count();
}

Status BlockSender::answer_pull(PeerLink& link, uint64_t request_id, const PullPayload& p,
                                const SendEncoding& encoding) {
  const uint64_t size = g_.image_size();
  if (p.length == 0 || p.length > kMaxDataLength || p.offset > size || p.length > size - p.offset)
    return protocol_error(ErrorCode::BadFrame, fmt::format("PULL of {} bytes at {}: not inside the {}-byte image "
                                                           "in one frame (at most {} bytes)",
                                                           p.length, p.offset, size, kMaxDataLength));
  const bool priority = p.priority != 0;
  const bool aligned =
      p.offset % g_.block_size() == 0 && (p.length % g_.block_size() == 0 || p.offset + p.length == size);
  if (aligned) {
    auto sent = send_blocks(link, g_.blocks_touched(p.offset, p.length), request_id, priority, encoding);
    return sent ? Status::ok() : sent.status();  // NOLINT: sent's value is not needed
  }
  // An unaligned proxied read: the exact bytes, in one frame.
  std::string buf(p.length, '\0');
  if (image_.pread(buf.data(), p.length, p.offset) < 0) return read_error(p.length, p.offset);
  DataPayload d{p.offset, p.length, 0, {reinterpret_cast<const uint8_t*>(buf.data()), buf.size()}};
  link.send_data(d, request_id, priority);
  stats_.payload_bytes_sent.fetch_add(p.length, std::memory_order_relaxed);
  return Status::ok();
}

Result<uint64_t> BlockSender::hash_range(uint64_t offset, uint64_t length) {
  std::unique_ptr<XXH3_state_t, decltype(&XXH3_freeState)> st(XXH3_createState(), XXH3_freeState);
  XXH3_64bits_reset(st.get());
  std::vector<char> buf(std::min<uint64_t>(length, 4u << 20));
  for (uint64_t done = 0; done < length;) {
    uint64_t n = std::min<uint64_t>(buf.size(), length - done);
    if (image_.pread(buf.data(), n, offset + done) < 0) return read_error(n, offset + done);
    XXH3_64bits_update(st.get(), buf.data(), n);
    done += n;
  }
  return XXH3_64bits_digest(st.get());
}

Result<SumsReplyPayload> BlockSender::sums(const SumsPayload& p) {
  const uint64_t size = g_.image_size();
  if (p.offset > size)
    return protocol_error(ErrorCode::BadFrame, fmt::format("SUMS at {}: beyond the {}-byte image", p.offset, size));
  SumsReplyPayload reply{p.offset, p.unit, {}};
  for (uint32_t i = 0; i < p.count; ++i) {
    uint64_t off = p.offset + uint64_t{i} * p.unit;
    if (off >= size) break;
    auto h = hash_range(off, std::min<uint64_t>(p.unit, size - off));
    if (!h) return h.status();
    reply.hashes.push_back(*h);
  }
  return reply;
}

}  // namespace livemig
