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

struct MigrationParams {
  std::string mode = "precopy";     // precopy | postcopy | livefs | hybrid | auto
  std::string to;                   // destination HOST:PORT
  std::string from;                 // how the destination reaches the source
  std::string handover = "explicit";  // explicit | auto | on-disconnect
  uint64_t handover_size = 64ull << 20;  // bytes left at most before handover
  uint64_t max_rate = 0;                 // bytes/s on the wire, 0 = no cap
  unsigned max_rounds = 30;              // pre-copy rounds before handing over anyway
  uint64_t transfer_unit = 1ull << 20;   // bytes in one transfer at most
  PolicyParams policy;                   // mode, threshold, weights, monitoring

  // Parses a migrate request; errors name the field ("migrate: ...").
  static Result<MigrationParams> from_json(const nlohmann::json& j, const std::string& default_handover);
  nlohmann::json to_json() const;
};

}  // namespace livemig
