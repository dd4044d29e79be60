// The decisions of handover groups this plugin coordinates (docs/handover.md,
// "Groups"): several disks of one VM are handed over together, all or none.
// Their sources prepare (HANDOVER with PREPARE), then one plugin, the
// coordinator (the first disk's destination), records the group's decision:
// commit or abort. Every source follows that record, so a decision once
// written is the group's outcome for good.
//
// Design notes
// ------------
// The record is a file beside the image, IMAGE.livemig-groups: one line per
// group, "commit GROUP" or "abort GROUP", appended and fdatasync'd (the
// directory too when the file is new) before decide() answers. The first
// decision for a group wins: a later one, the same or not, is answered with
// the one recorded. A line cut short by a crash (no newline) was never
// answered: load() drops it. Two-phase commit with presumed abort: a group
// with no line is undecided, and a source that waited too long records
// abort itself (the first decision still wins, so a commit that got there
// first stands).
#pragma once

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>

#include "common/mutex.h"
#include "common/status.h"

namespace livemig {

enum class GroupDecision { Commit, Abort };

// "commit" / "abort".
const char* group_decision_name(GroupDecision d);
// Parses "commit" or "abort"; anything else is an error naming the text.
Result<GroupDecision> parse_group_decision(std::string_view text);
// A group id: 1 to 128 bytes of [A-Za-z0-9._:-]. Error: why not.
Status check_group_id(std::string_view group);

class GroupDecisions {
 public:
  // The record that belongs to an image: "<image>.livemig-groups".
  static std::string path_for_image(const std::string& image_path);

  explicit GroupDecisions(std::string path) : path_(std::move(path)) {}

  // The decision recorded for `group`, nullopt if undecided. Reads the file
  // on first use; errors name the path.
  Result<std::optional<GroupDecision>> outcome(const std::string& group);
  // Records `d` for `group` unless a decision is recorded already, durably;
  // returns the recorded decision (the first one) and whether this call
  // recorded it.
  struct Recorded {
    GroupDecision decision;
    bool now;  // this call wrote it
  };
  Result<Recorded> decide(const std::string& group, GroupDecision d);

  const std::string& path() const { return path_; }

 private:
  Status load_locked() REQUIRES(mu_);

  const std::string path_;
  Mutex mu_;
  bool loaded_ GUARDED_BY(mu_) = false;
  std::map<std::string, GroupDecision, std::less<>> decided_ GUARDED_BY(mu_);
};

}  // namespace livemig
