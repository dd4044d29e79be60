// Compression of DATA on the link (issue #14): zstd, frame by frame.
//
// Only the source compresses, and only what it pushes or sends in answer to
// background pulls: a demand read (a guest waits) crosses plain, so that
// its latency never pays for a compressor. The destination decompresses
// every COMPRESSED frame into exactly its `length` bytes before anything
// else sees it (a frame that decompresses to more or less is a bad frame).
//
// CompressionGovernor decides per frame. With "auto" it compresses only
// when both hold:
//  - the link is what holds the transfer back: the send queue is backed up
//    (at least kBacklogBytes queued when a frame is sent, in most recent
//    frames) or max_rate caps the wire. When the sender waits for its disk
//    or its CPU, fewer wire bytes gain nothing and the CPU is the guest's.
//  - the data compresses: recent frames shrank to at most kWorthRatio of
//    their size. Otherwise one frame in kProbeEvery is tried, to notice when
//    the data changes (zstd gives up on random data at GB/s, so a probe is
//    cheap).
// The level follows the link: the strongest of kLevels whose compression
// speed (measured on this machine, scaled from the level in use) keeps up
// with what the link can carry once compressed (link rate / ratio) with a
// 1.5x margin. A 100 Mbit/s link gets level 3, 1 Gbit/s level 1 or a fast
// level, 10 Gbit/s a fast level or none. "zstd:N" always tries level N;
// "off" never compresses. In every setting a frame that does not shrink to
// kWorthRatio crosses plain.
#pragma once

#include <chrono>
#include <cstdint>
#include <mutex>
#include <optional>
#include <span>
#include <string>

#include <nlohmann/json.hpp>

#include "common/frame_codec.h"
#include "common/migration_params.h"
#include "common/mutex.h"
#include "common/status.h"

namespace livemig {

// A frame is sent compressed only if it shrinks to this fraction or less.
inline constexpr double kWorthRatio = 0.9;

// Compresses `in` at zstd `level` into `out` with this thread's context.
// False if the result is not at most kWorthRatio of `in` (out is then
// unspecified: send the frame plain).
bool compress_frame(std::span<const uint8_t> in, int level, std::string& out);

// The data of a COMPRESSED DATA frame, exactly p.length bytes, into `out`;
// a BadFrame error naming the problem if the bytes are not one zstd frame
// of that size.
Status decompress_frame(const DataPayload& p, std::string& out);

class CompressionGovernor {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr uint64_t kBacklogBytes = 256u << 10;
  static constexpr unsigned kProbeEvery = 32;
  // Strongest first, with their speed relative to level 1 (zstd 1.5 on this
  // project's test machine, 256 KiB frames of /usr: 3 0.6x, -1 1.25x,
  // -3 1.4x, -5 1.55x).
  struct Level {
    int level;
    double relative_speed;
  };
  static constexpr Level kLevels[] = {{3, 0.6}, {1, 1.0}, {-1, 1.25}, {-3, 1.4}, {-5, 1.55}};

  CompressionGovernor(Compression setting, uint64_t max_rate) : setting_(setting), max_rate_(max_rate) {}

  // The peer cannot decompress (it did not say it can): never compress.
  void disable(std::string why);
  // The zstd level to try on the next frame, or nullopt to send it plain.
  // `queued`: the link's send queue now; `sent`: every byte it ever wrote.
  std::optional<int> level_for_next(uint64_t queued, uint64_t sent, Clock::time_point now);
  // What a try cost and gave: `out` 0 if the frame did not shrink enough.
  void record_try(int level, uint64_t in, uint64_t out, std::chrono::nanoseconds took);
  // {"setting", "active", "level", "reason", "link_bound", "ratio", ...}.
  nlohmann::json to_json() const;

 private:
  std::optional<int> decide_locked() REQUIRES(mu_);
  void sample_link_locked(uint64_t queued, uint64_t sent, Clock::time_point now) REQUIRES(mu_);
  std::optional<int> pick_level_locked() const REQUIRES(mu_);

  const Compression setting_;
  const uint64_t max_rate_;
  mutable Mutex mu_;
  std::string disabled_ GUARDED_BY(mu_);            // why, if the peer cannot decompress
  bool active_ GUARDED_BY(mu_) = false;             // auto: compressing now (hysteresis on link_bound_)
  double link_bound_ GUARDED_BY(mu_) = 0;           // EWMA over frames of "the send queue was backed up"
  double ratio_ GUARDED_BY(mu_) = 0.5;              // EWMA of compressed / plain size over tried frames
  double level1_speed_ GUARDED_BY(mu_) = 0;         // bytes/s of plain data, level-1 equivalent; 0: not measured
  double link_rate_ GUARDED_BY(mu_) = 0;            // bytes/s the link wrote, while backed up
  uint64_t last_sent_ GUARDED_BY(mu_) = 0;
  Clock::time_point last_sample_ GUARDED_BY(mu_){};
  uint64_t frames_ GUARDED_BY(mu_) = 0;
  int level_ GUARDED_BY(mu_) = 1;                   // the level last chosen
  std::string reason_ GUARDED_BY(mu_) = "not started";
};

}  // namespace livemig
