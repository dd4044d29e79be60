// The parameters of one migration, as the migrate control operation takes
// them (a mode is a set of these). The plugin's engine runs with them;
// livemigd checks a submitted migration with the same parser before it
// queues it, so a bad mode or parameter is refused at submission.
#pragma once

#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "common/migration_policy.h"
#include "common/status.h"

namespace livemig {

// What triggers the handover once the source is ready.
enum class HandoverPolicy {
  Explicit,      // a `handover` control request
  Auto,          // as soon as ready
  OnDisconnect,     // when the last NBD client of the source disconnects
  OnDestinationIo,  // when the destination's clients write and the source's are quiet
};
const char* handover_policy_name(HandoverPolicy p);
// "explicit", "auto", "on-disconnect" or "on-destination-io"; the error
// names them all.
Result<HandoverPolicy> parse_handover_policy(const std::string& s);

inline constexpr double kDefaultGuestLatencyBound = 1.2;
inline constexpr uint64_t kDefaultMinRate = 16ull << 20;
inline constexpr double kDefaultMaxSlowdown = 1.3;  // auto's time budget for pacing

// guest_latency_bound and max_slowdown: 0 (off), or a factor from 1 to 1000.
inline bool is_pacing_factor(double v) { return v == 0 || (v >= 1 && v <= 1000); }

// Compression of the DATA the source sends (issue #14): "auto" compresses
// when the link, not the CPU, is what holds the transfer back and the data
// compresses (the level follows the link's rate); "off" never; "zstd[:N]"
// always tries, at level N (default 1). Frames that do not shrink cross
// plain in every case.
struct Compression {
  enum class Kind { Auto, Off, Zstd };
  Kind kind = Kind::Auto;
  int level = 1;  // Zstd's fixed level
  std::string name() const;
  bool operator==(const Compression&) const = default;
};
inline constexpr int kMinCompressionLevel = -7, kMaxCompressionLevel = 19;
// "auto", "off", "zstd" or "zstd:N" (N from -7 to 19); the error says so.
Result<Compression> parse_compression(const std::string& s);

struct MigrationParams {
  std::string to;                   // destination HOST:PORT
  std::string from;                 // how the destination reaches the source
  HandoverPolicy handover = HandoverPolicy::Explicit;
  uint64_t handover_size = 64ull << 20;  // bytes left at most before handover
  uint64_t max_rate = 0;                 // bytes/s on the wire, 0 = no cap
  unsigned max_rounds = 30;              // pre-copy rounds before handing over anyway
  uint64_t transfer_unit = 1ull << 20;   // bytes in one transfer at most
  // Seconds the source keeps trying to reach a lost destination before
  // handover (resuming where it was) before the migration fails.
  double resume_timeout = 300;
  // Guest first: the background transfer slows down while the guest's p99
  // request latency is above this many times its p99 before the migration
  // (0: no pacing; auto's default is kDefaultGuestLatencyBound), never
  // below min_rate. The baseline is measured by the source when the
  // migration starts (or given), and travels in START to the destination.
  double guest_latency_bound = 0;
  uint64_t min_rate = kDefaultMinRate;
  double max_slowdown = 0;  // pacing keeps the rate >= fastest unpaced / this (0: min_rate only)
  uint64_t guest_baseline_p99_ns = 0;
  uint64_t guest_baseline_requests = 0;
  // Guest first: the nice value (0 to 19, common/thread_nice.h) of the
  // threads that move the data on both sides (the io thread, the disk pool,
  // the pusher, the puller and the persister) while this migration runs.
  // 0: the guest's own priority.
  int migration_nice = 0;
  Compression compression;
  // The source's base image (its identity, plugin/base_image.h), set by the
  // source from its base= and checked by the destination against its own;
  // empty: no base.
  std::string base_identity;
  PolicyParams policy;                   // mode, threshold, weights, monitoring

  MigrationMode mode() const { return policy.mode; }
  // Parses a migrate request; errors name the field ("migrate: ...").
  static Result<MigrationParams> from_json(const nlohmann::json& j, HandoverPolicy default_handover);
  nlohmann::json to_json() const;
};

}  // namespace livemig
