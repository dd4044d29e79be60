// Sending image contents to the peer: pushes before handover and answers to
// PULL and SUMS, shared by both roles (a source answers its destination's
// pulls; a destination after the commit answers its old source's reads).
//
// Holes cross as ZERO notes without being read, and all-zero blocks as
// ZERO notes after reading (invariant 3). Data goes in frames of at most
// kMaxFrameData bytes, so a demand reply (priority lane) overtakes queued
// background data at the next frame boundary.
#pragma once

#include <cstdint>

#include "common/frame_codec.h"
#include "common/peer_link.h"
#include "common/segment_geometry.h"
#include "common/status.h"
#include "plugin/engine_stats.h"
#include "plugin/base_image.h"
#include "plugin/image_file.h"
#include "plugin/link_compression.h"

namespace livemig {

// Block data in one DATA frame at most (a multiple of every block size).
inline constexpr uint64_t kMaxFrameData = 256u << 10;

// How background data may cross besides plain (priority frames, which a
// guest waits for, always cross plain): compressed as `compression` says,
// and blocks equal to `base` as BASE notes (the peer checked it holds the
// same base).
struct SendEncoding {
  CompressionGovernor* compression = nullptr;
  const BaseImage* base = nullptr;
};

class BlockSender {
 public:
  BlockSender(ImageFile& image, const SegmentGeometry& geometry, EngineStats& stats)
      : image_(image), g_(geometry), stats_(stats) {}

  struct Sent {
    uint64_t data_blocks = 0;  // holes and zero blocks not counted
    uint64_t frames = 0;       // DATA frames queued
  };
  // The blocks from r.first on, within r, that lie wholly in a hole of the
  // image (0 if r.first holds data). A hint: a write may land meanwhile.
  uint64_t hole_blocks_at(IndexRange r) const;
  // Sends `blocks` on `link` as DATA frames with `request_id` (0: pushed),
  // encoded as `encoding` allows (not priority frames).
  // On a read error, the frames queued before it stay queued.
  Result<Sent> send_blocks(PeerLink& link, IndexRange blocks, uint64_t request_id, bool priority,
                           const SendEncoding& encoding = {});
  // Answers a PULL from the local image: block-aligned ranges as blocks,
  // anything else as the exact bytes in one frame. A range outside the
  // image or over kMaxDataLength is a BadFrame error; a read error is
  // Internal. The caller sends the ERROR (for this request only).
  Status answer_pull(PeerLink& link, uint64_t request_id, const PullPayload& p,
                     const SendEncoding& encoding = {});
  // Answers a SUMS: xxh3-64 of each unit of the local image.
  Result<SumsReplyPayload> sums(const SumsPayload& p);
  // The xxh3-64 of [offset, offset + length) of the local image.
  Result<uint64_t> hash_range(uint64_t offset, uint64_t length);

 private:
  // Sends data blocks `blocks` (their bytes at `data`): equal-to-base runs
  // as notes, the rest as frames of at most kMaxFrameData.
  void send_data_blocks(PeerLink& link, IndexRange blocks, const char* data, uint64_t request_id, bool priority,
                        const SendEncoding& encoding, Sent& sent);
  void send_frames(PeerLink& link, IndexRange blocks, const char* data, uint64_t request_id, bool priority,
                   CompressionGovernor* compression, Sent& sent);
  // Makes `d` COMPRESSED (its bytes in `buf`) if the governor asks and the
  // frame shrinks enough.
  void maybe_compress(CompressionGovernor& compression, const PeerLink& link, DataPayload& d, std::string& buf);

  ImageFile& image_;
  const SegmentGeometry& g_;
  EngineStats& stats_;
};

}  // namespace livemig
