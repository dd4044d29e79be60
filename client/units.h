// Sizes, rates and durations as migrate-nbd and livemigd read them from the
// command line (and livemigd's config file) and write them for people.
//
//   SIZE  bytes, with an optional binary suffix K, M, G or T (also KiB, MiB,
//         ...; case-insensitive): 4096, 64K, 1.5G. The plugin's keys take
//         the same syntax.
//   RATE  bytes per second as a SIZE (100M = 100 MiB/s), or bits per second
//         with a decimal suffix as tc writes them: 800kbit, 100Mbit, 1Gbit
//         (1Gbit = 125,000,000 bytes/s). "/s" may follow; 0 means no cap.
#pragma once

#include <cstdint>
#include <string>

#include "common/status.h"

namespace livemig::client {

// Parses a SIZE; errors name `what` (e.g. "--handover-size") and the value.
Result<uint64_t> parse_size(const std::string& text, const std::string& what);
// Parses a RATE into bytes per second; errors name `what` and the value.
Result<uint64_t> parse_rate(const std::string& text, const std::string& what);

// 1536 -> "1.5 KiB"; below 1 KiB "512 B".
std::string format_bytes(double bytes);
// Bytes per second as "110.3 MiB/s".
std::string format_rate(double bytes_per_second);
// Seconds as "850 ms", "42 s", "3m07s", "2h05m"; negative -> "-".
std::string format_seconds(double seconds);
// Milliseconds as the plugin reports them (-1 = not yet): "-" or format_seconds.
std::string format_ms(int64_t ms);

}  // namespace livemig::client
