#include "client/units.h"

#include <cctype>
#include <cmath>
#include <cstdlib>
#include <limits>

#include <fmt/format.h>

namespace livemig::client {
namespace {

std::string lower(std::string s) {
  for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return s;
}

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// Splits "1.5G" into 1.5 and "g". False if there is no number in front.
bool split_number(const std::string& text, double* number, std::string* unit) {
  size_t i = 0;
  while (i < text.size() && (std::isdigit(static_cast<unsigned char>(text[i])) || text[i] == '.')) ++i;
  if (i == 0) return false;
  std::string digits = text.substr(0, i);
  if (digits.find('.') != digits.rfind('.') || digits == ".") return false;
  char* end = nullptr;
  *number = std::strtod(digits.c_str(), &end);
  if (end != digits.c_str() + digits.size()) return false;
  size_t j = i;
  while (j < text.size() && text[j] == ' ') ++j;
  *unit = lower(text.substr(j));
  return true;
}

// The multiplier of a binary size suffix ("", "k", "kib", "kb", ...), or 0.
double binary_multiplier(std::string unit) {
  if (ends_with(unit, "ib")) unit.resize(unit.size() - 2);
  else if (unit.size() == 2 && unit[1] == 'b') unit.resize(1);
  if (unit.empty() || unit == "b") return 1;
  static const std::string kLetters = "kmgtp";
  if (unit.size() != 1) return 0;
  size_t pos = kLetters.find(unit[0]);
  if (pos == std::string::npos) return 0;
  return std::ldexp(1.0, 10 * static_cast<int>(pos + 1));
}

Result<uint64_t> checked(double value, const std::string& text, const std::string& what) {
  if (!std::isfinite(value) || value < 0 || value >= 18446744073709551615.0)
    return Status::error(fmt::format("{} '{}': too large", what, text));
  return static_cast<uint64_t>(value);
}

}  // namespace

Result<uint64_t> parse_size(const std::string& text, const std::string& what) {
  double number = 0;
  std::string unit;
  double mult = 0;
  if (split_number(text, &number, &unit)) mult = binary_multiplier(unit);
  if (mult == 0)
    return Status::error(
        fmt::format("{} '{}': expected a size such as 4096, 64K, 512M or 2G (binary suffixes K, M, G, T)", what,
                    text));
  return checked(number * mult, text, what);
}

Result<uint64_t> parse_rate(const std::string& text, const std::string& what) {
  double number = 0;
  std::string unit;
  if (split_number(text, &number, &unit)) {
    if (ends_with(unit, "/s")) unit.resize(unit.size() - 2);
    if (ends_with(unit, "bps")) unit.replace(unit.size() - 3, 3, "bit");  // 1Gbps = 1Gbit
    if (ends_with(unit, "bit")) {  // bits per second, decimal prefixes (tc's syntax)
      std::string prefix = unit.substr(0, unit.size() - 3);
      double mult = 0;
      if (prefix.empty()) mult = 1;
      else if (prefix == "k") mult = 1e3;
      else if (prefix == "m") mult = 1e6;
      else if (prefix == "g") mult = 1e9;
      else if (prefix == "t") mult = 1e12;
      if (mult != 0) return checked(number * mult / 8, text, what);
    } else if (double mult = binary_multiplier(unit); mult != 0) {
      return checked(number * mult, text, what);
    }
  }
  return Status::error(fmt::format(
      "{} '{}': expected bytes/s such as 100M or 1G, or bits/s such as 500Mbit or 1Gbit (0 = no cap)", what,
      text));
}

std::string format_bytes(double bytes) {
  if (bytes < 0) return "-";
  static const char* const kUnits[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB"};
  int u = 0;
  while (bytes >= 1024 && u < 5) {
    bytes /= 1024;
    ++u;
  }
  if (u == 0) return fmt::format("{:.0f} B", bytes);
  if (bytes == std::floor(bytes)) return fmt::format("{:.0f} {}", bytes, kUnits[u]);  // 64 MiB, not 64.0 MiB
  int decimals = bytes < 10 ? 2 : bytes < 100 ? 1 : 0;
  return fmt::format("{:.{}f} {}", bytes, decimals, kUnits[u]);
}

std::string format_rate(double bytes_per_second) {
  if (bytes_per_second < 0) return "-";
  return format_bytes(bytes_per_second) + "/s";
}

std::string format_seconds(double s) {
  if (s < 0 || !std::isfinite(s)) return "-";
  if (s < 1) return fmt::format("{:.0f} ms", s * 1000);
  if (s < 10) return fmt::format("{:.1f} s", s);
  if (s < 60) return fmt::format("{:.0f} s", s);
  auto total = static_cast<uint64_t>(s + 0.5);
  if (total < 3600) return fmt::format("{}m{:02}s", total / 60, total % 60);
  return fmt::format("{}h{:02}m", total / 3600, total % 3600 / 60);
}

std::string format_ms(int64_t ms) {
  if (ms < 0) return "-";
  return format_seconds(ms / 1000.0);
}

}  // namespace livemig::client
