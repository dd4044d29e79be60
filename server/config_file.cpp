#include "server/config_file.h"

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>

#include <fmt/format.h>

namespace livemig::daemon {
namespace {

std::string_view trim(std::string_view s) {
  const char* blanks = " \t\r";
  size_t b = s.find_first_not_of(blanks);
  if (b == std::string_view::npos) return {};
  return s.substr(b, s.find_last_not_of(blanks) - b + 1);
}

// A value written in quotes ("a b" or 'a b') loses them.
std::string_view unquote(std::string_view v) {
  if (v.size() >= 2 && (v.front() == '"' || v.front() == '\'') && v.back() == v.front())
    return v.substr(1, v.size() - 2);
  return v;
}

}  // namespace

std::string config_where(const std::string& path, const ConfigEntry& entry) {
  return fmt::format("{} line {}", path, entry.line);
}

Result<std::vector<ConfigEntry>> parse_config_text(const std::string& path, std::string_view text) {
  std::vector<ConfigEntry> entries;
  std::map<std::string, int> seen;  // key -> line
  int number = 0;
  while (!text.empty()) {
    size_t nl = text.find('\n');
    std::string_view raw = text.substr(0, nl);
    text = nl == std::string_view::npos ? std::string_view() : text.substr(nl + 1);
    ++number;
    std::string_view line = trim(raw);
    if (line.empty() || line.front() == '#') continue;
    const std::string where = fmt::format("{} line {}", path, number);
    if (line.front() == '[')
      return Status::error(fmt::format("{}: {}: livemigd's configuration has no sections; write `key = value` lines",
                                       where, line));
    size_t eq = line.find('=');
    if (eq == std::string_view::npos)
      return Status::error(fmt::format("{}: '{}': expected `key = value` (no '=' on the line)", where, line));
    ConfigEntry e;
    e.line = number;
    e.key = trim(line.substr(0, eq));
    e.value = unquote(trim(line.substr(eq + 1)));
    if (e.key.empty()) return Status::error(fmt::format("{}: '{}': no key before '='", where, line));
    if (e.value.empty())
      return Status::error(fmt::format("{}: {}: no value after '=' (comment the line out to keep the default)",
                                       where, e.key));
    if (auto [it, added] = seen.emplace(e.key, number); !added)
      return Status::error(fmt::format("{}: {}: given twice (first on line {})", where, e.key, it->second));
    entries.push_back(std::move(e));
  }
  return entries;
}

Result<std::vector<ConfigEntry>> read_config_file(const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    return Status::error(fmt::format("configuration file {}: is a directory", path), EISDIR);
  std::ifstream in(path, std::ios::binary);
  if (!in) return Status::error(fmt::format("configuration file {}: {}", path, std::strerror(errno)), errno);
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return Status::error(fmt::format("configuration file {}: read error", path), EIO);
  return parse_config_text(path, text.str());
}

}  // namespace livemig::daemon
