// Small pieces shared by the lm-workload subcommands: an owning libnbd handle,
// number and region parsing, a latency histogram, messages.
#pragma once

#include <libnbd.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>

#include <fmt/format.h>

#include "common/status.h"

namespace livemig::workload {

using Clock = std::chrono::steady_clock;

// Exit codes of every subcommand.
inline constexpr int kExitOk = 0;
inline constexpr int kExitFailed = 1;  // verification found bad blocks / writes were lost or refused
inline constexpr int kExitUsage = 2;   // bad arguments, unreachable server, unusable journal

struct NbdClose {
  void operator()(nbd_handle* h) const { nbd_close(h); }
};
using NbdHandle = std::unique_ptr<nbd_handle, NbdClose>;

// An open connection and what the server said about the export.
struct NbdConnection {
  NbdHandle handle;
  uint64_t size = 0;
  bool read_only = false;
  bool can_fua = false;
  bool can_flush = false;
};

// Connects (synchronously) to an NBD URI such as nbd://host:port/export or
// nbd+unix:///?socket=/path.
Result<NbdConnection> nbd_connect(const std::string& uri);

// libnbd's last error, as one line.
std::string nbd_last_error();

// Parses "4096", "64K", "1M", "2G", "1T" (binary multiples).
std::optional<uint64_t> parse_size(const std::string& text);

// A block range. first/count are in blocks.
struct BlockRange {
  uint64_t first = 0;
  uint64_t count = 0;
};

// Resolves --blocks N / --region OFFSET:LEN (at most one set) against the
// export: the default is the whole export. Notes a trailing partial block on
// stderr. Fails with a one-line reason.
Result<BlockRange> resolve_range(std::optional<uint64_t> blocks, const std::string& region,
                                 uint32_t block_size, uint64_t export_size);

// Log-linear latency histogram (about 1.5% resolution), values in nanoseconds.
class LatencyHistogram {
 public:
  void record(uint64_t ns);
  void merge(const LatencyHistogram& other);
  void reset() { *this = LatencyHistogram(); }
  uint64_t count() const { return count_; }
  uint64_t max() const { return max_; }
  double mean() const { return count_ ? static_cast<double>(sum_) / count_ : 0.0; }
  // The value below which a fraction q (0..1) of the samples fall; 0 if empty.
  uint64_t percentile(double q) const;

 private:
  static constexpr int kSubBits = 6;  // 64 sub-buckets per power of two
  static constexpr int kBuckets = (64 - kSubBits + 1) << kSubBits;
  static int bucket_of(uint64_t ns);
  static uint64_t bucket_mid(int bucket);
  std::array<uint64_t, kBuckets> buckets_{};
  uint64_t count_ = 0;
  uint64_t sum_ = 0;
  uint64_t max_ = 0;
};

// "0.42 ms"
std::string format_ms(uint64_t ns);

// Messages: one line each, prefixed with the program name.
template <typename... Args>
void note(fmt::format_string<Args...> f, Args&&... args) {
  fmt::print(stdout, "lm-workload: {}\n", fmt::format(f, std::forward<Args>(args)...));
  std::fflush(stdout);
}
template <typename... Args>
void warn(fmt::format_string<Args...> f, Args&&... args) {
  std::fflush(stdout);
  fmt::print(stderr, "lm-workload: warning: {}\n", fmt::format(f, std::forward<Args>(args)...));
}
template <typename... Args>
void error(fmt::format_string<Args...> f, Args&&... args) {
  std::fflush(stdout);
  fmt::print(stderr, "lm-workload: error: {}\n", fmt::format(f, std::forward<Args>(args)...));
}

}  // namespace livemig::workload
