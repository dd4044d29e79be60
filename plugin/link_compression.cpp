#include "plugin/link_compression.h"

#include <zstd.h>

#include <algorithm>
#include <memory>

#include <fmt/format.h>

#include "common/protocol_format.h"

namespace livemig {
namespace {

// A zstd context per thread: compressing runs on the pusher and the pool
// threads that answer pulls, decompressing on the io thread.
ZSTD_CCtx* thread_cctx() {
  thread_local std::unique_ptr<ZSTD_CCtx, decltype(&ZSTD_freeCCtx)> ctx(ZSTD_createCCtx(), ZSTD_freeCCtx);
  return ctx.get();
}

ZSTD_DCtx* thread_dctx() {
  thread_local std::unique_ptr<ZSTD_DCtx, decltype(&ZSTD_freeDCtx)> ctx = [] {
    std::unique_ptr<ZSTD_DCtx, decltype(&ZSTD_freeDCtx)> c(ZSTD_createDCtx(), ZSTD_freeDCtx);
    // No window larger than the largest frame a peer may send (the frame's
    // own content size is checked too): a hostile frame cannot make us
    // allocate zstd's default 128 MiB.
    if (c) ZSTD_DCtx_setParameter(c.get(), ZSTD_d_windowLogMax, 24);
    return c;
  }();
  return ctx.get();
}

constexpr double kEwmaFrames = 1.0 / 16;  // link_bound_ and ratio_ follow ~16 frames (4 MiB)
constexpr double kSampleSeconds = 0.25;

double ewma(double old, double sample, double weight) { return old + weight * (sample - old); }

}  // namespace

bool compress_frame(std::span<const uint8_t> in, int level, std::string& out) {
  ZSTD_CCtx* cctx = thread_cctx();
  if (!cctx || in.empty()) return false;
  // Room for a worthwhile result only: zstd stops as soon as it cannot fit.
  out.resize(static_cast<size_t>(double(in.size()) * kWorthRatio));
  size_t n = ZSTD_compressCCtx(cctx, out.data(), out.size(), in.data(), in.size(), level);
  if (ZSTD_isError(n)) return false;
  out.resize(n);
  return true;
}

Status decompress_frame(const DataPayload& p, std::string& out) {
  auto bad = [&p](const std::string& what) {
    return protocol_error(ErrorCode::BadFrame, fmt::format("compressed DATA at {} ({} bytes): {}", p.offset,
                                                           p.length, what));
  };
  const uint8_t* src = p.bytes.data();
  const size_t n = p.bytes.size();
  unsigned long long size = ZSTD_getFrameContentSize(src, n);
  if (size == ZSTD_CONTENTSIZE_ERROR) return bad("not a zstd frame");
  if (size == ZSTD_CONTENTSIZE_UNKNOWN) return bad("the zstd frame does not state its size");
  if (size != p.length) return bad(fmt::format("the zstd frame holds {} bytes", size));
  size_t frame = ZSTD_findFrameCompressedSize(src, n);
  if (ZSTD_isError(frame)) return bad(fmt::format("truncated zstd frame ({})", ZSTD_getErrorName(frame)));
  if (frame != n) return bad(fmt::format("{} bytes after the zstd frame", n - frame));
  ZSTD_DCtx* dctx = thread_dctx();
  if (!dctx) return protocol_error(ErrorCode::Internal, "cannot allocate a zstd context");
  out.resize(p.length);
  size_t got = ZSTD_decompressDCtx(dctx, out.data(), out.size(), src, n);
  if (ZSTD_isError(got)) return bad(ZSTD_getErrorName(got));
  if (got != p.length) return bad(fmt::format("decompressed to {} bytes", got));
  return Status::ok();
}

void CompressionGovernor::disable(std::string why) {
  MutexLock lock(mu_);
  disabled_ = std::move(why);
}

std::optional<int> CompressionGovernor::level_for_next(uint64_t queued, uint64_t sent, Clock::time_point now) {
  MutexLock lock(mu_);
  frames_++;
  if (!disabled_.empty() || setting_.kind == Compression::Kind::Off) return std::nullopt;
  if (setting_.kind == Compression::Kind::Zstd) return setting_.level;
  sample_link_locked(queued, sent, now);
  return decide_locked();
}

void CompressionGovernor::sample_link_locked(uint64_t queued, uint64_t sent, Clock::time_point now) {
  link_bound_ = ewma(link_bound_, queued >= kBacklogBytes ? 1.0 : 0.0, kEwmaFrames);
  if (last_sample_ == Clock::time_point{} || sent < last_sent_) {
    last_sample_ = now;
    last_sent_ = sent;
    return;
  }
  double dt = std::chrono::duration<double>(now - last_sample_).count();
  if (dt < kSampleSeconds) return;
  // What the link wrote is its capacity only while data waited for it.
  if (link_bound_ >= 0.5) link_rate_ = ewma(link_rate_ == 0 ? double(sent - last_sent_) / dt : link_rate_,
                                            double(sent - last_sent_) / dt, 0.5);
  last_sample_ = now;
  last_sent_ = sent;
}

std::optional<int> CompressionGovernor::decide_locked() {
  // Hysteresis: compressing drains the queue a little; do not flap.
  const bool capped = max_rate_ != 0;
  if (!active_ && (capped || link_bound_ >= 0.5)) active_ = true;
  else if (active_ && !capped && link_bound_ < 0.2) active_ = false;
  if (!active_) {
    reason_ = "the link keeps up: the sender waits for its disk or CPU";
    return std::nullopt;
  }
  if (ratio_ > kWorthRatio) {
    reason_ = "the data does not compress (trying 1 frame in 32)";
    return frames_ % kProbeEvery == 0 ? std::optional<int>(level_) : std::nullopt;
  }
  std::optional<int> level = pick_level_locked();
  if (!level) {
    reason_ = "the CPU compresses slower than the link sends";
    return frames_ % kProbeEvery == 0 ? std::optional<int>(kLevels[std::size(kLevels) - 1].level) : std::nullopt;
  }
  level_ = *level;
  reason_ = capped ? "max_rate caps the link" : "the link is the bottleneck";
  return level_;
}

std::optional<int> CompressionGovernor::pick_level_locked() const {
  // Under max_rate the queue does not back up, so the link's own rate may
  // never have been measured: the cap is the rate then.
  double rate = link_rate_;
  if (max_rate_ != 0) rate = rate == 0 ? double(max_rate_) : std::min(rate, double(max_rate_));
  if (level1_speed_ == 0 || rate == 0) return 1;
  // Plain bytes per second the link carries once compressed, with a margin.
  double needed = 1.5 * rate / std::max(ratio_, 0.05);
  for (const Level& l : kLevels)
    if (level1_speed_ * l.relative_speed >= needed) return l.level;
  // Even the fastest level cannot keep up with the link's compressed rate,
  // but it still moves more than the link alone does plain.
  const Level& fastest = kLevels[std::size(kLevels) - 1];
  if (level1_speed_ * fastest.relative_speed > 1.2 * rate) return fastest.level;
  return std::nullopt;
}

void CompressionGovernor::record_try(int level, uint64_t in, uint64_t out, std::chrono::nanoseconds took) {
  if (in == 0) return;
  MutexLock lock(mu_);
  ratio_ = ewma(ratio_, out == 0 ? 1.0 : double(out) / double(in), kEwmaFrames);
  // Speeds of frames zstd gave up on (random data, at GB/s) say nothing
  // about the data that does compress.
  if (out == 0 || took.count() <= 0) return;
  double relative = 1.0;
  for (const Level& l : kLevels)
    if (l.level == level) relative = l.relative_speed;
  double speed = double(in) / std::chrono::duration<double>(took).count() / relative;
  level1_speed_ = level1_speed_ == 0 ? speed : ewma(level1_speed_, speed, 1.0 / 8);
}

nlohmann::json CompressionGovernor::to_json() const {
  MutexLock lock(mu_);
  nlohmann::json j = {{"setting", setting_.name()}, {"active", false}};
  if (!disabled_.empty()) j["reason"] = disabled_;
  if (!disabled_.empty() || setting_.kind == Compression::Kind::Off) return j;
  const bool fixed = setting_.kind == Compression::Kind::Zstd;
  j.update({{"active", fixed || active_}, {"level", fixed ? setting_.level : level_}, {"recent_ratio", ratio_}});
  if (!fixed)
    j.update({{"reason", reason_},
              {"link_bound", link_bound_},
              {"link_bytes_per_second", link_rate_},
              {"level1_bytes_per_second", level1_speed_}});
  return j;
}

}  // namespace livemig
