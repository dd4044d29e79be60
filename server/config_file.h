// livemigd's configuration file (livemigd --config FILE): one `key = value` a
// line, blank lines, and comment lines starting with #. Read strictly, so that
// every mistake is reported with the file, the line and the key: a line
// without '=', an empty key or value, a [section] (livemigd has none), a key
// given twice. Which keys exist and what their values may be is the command
// line's business: livemigd_main.cpp gives each entry to the long option of
// the same name, whose checks then apply.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "common/status.h"

namespace livemig::daemon {

struct ConfigEntry {
  int line = 0;       // 1-based
  std::string key;    // as written, without --
  std::string value;  // surrounding blanks and one pair of quotes removed
};

// Parses the text of the configuration file `path` (named in errors as
// "PATH line N: ...").
Result<std::vector<ConfigEntry>> parse_config_text(const std::string& path, std::string_view text);

// Reads the file at `path` and parses it.
Result<std::vector<ConfigEntry>> read_config_file(const std::string& path);

// "PATH line N": where an entry was written, for messages about its value.
std::string config_where(const std::string& path, const ConfigEntry& entry);

}  // namespace livemig::daemon
