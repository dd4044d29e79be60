// `lm-workload write`: a verifying writer that behaves like a hypervisor's NBD
// client (one connection, a queue of asynchronous writes, switch of server at
// handover) and journals every acknowledged write.
#pragma once

#include <cstdint>
#include <optional>
#include <string>

#include "common/status.h"

namespace livemig::workload {

// How the next block is chosen inside the region.
struct Pattern {
  enum class Kind { kRandom, kSequential, kHot } kind = Kind::kRandom;
  double hot_fraction = 0;     // kHot: the first hot_fraction of the region is hot
  double hot_probability = 0;  // kHot: probability that a write goes to the hot part
};

// Parses "random", "sequential" or "hot:FRACTION:PROB" (e.g. hot:0.1:0.9).
Result<Pattern> parse_pattern(const std::string& text);

struct WriteOptions {
  std::string uri;
  std::string journal;
  uint32_t block_size = 4096;
  bool block_size_given = false;
  std::optional<uint64_t> blocks;
  std::string region;  // OFFSET:LEN, empty = not given
  Pattern pattern;
  std::string pattern_text = "random";
  double rate = 0;                  // writes per second, 0 = unthrottled
  std::optional<double> duration;   // seconds
  std::optional<uint64_t> count;    // new writes to issue
  unsigned queue_depth = 8;
  uint64_t fua_every = 0;
  uint64_t flush_every = 0;
  std::string switch_file;
  std::optional<uint64_t> seed;
  double stats_interval = 1.0;  // 0 = no progress lines
  double retry_timeout = 60.0;
  std::string json_out;
  bool final_flush = true;  // flush once more before exiting
  bool append = false;
  bool overwrite = false;
};

// Runs the workload; returns the process exit code.
int run_write(const WriteOptions& options);

}  // namespace livemig::workload
