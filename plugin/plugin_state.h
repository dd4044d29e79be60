// Everything one livemig.so instance holds: its keys, the image, the geometry,
// heat, request counters and the background runtime. There is one instance per
// nbdkit process (one image), created in .load and destroyed in .unload.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <optional>

#include "common/heat_map.h"
#include "common/segment_geometry.h"
#include "plugin/base_image.h"
#include "plugin/group_decisions.h"
#include "plugin/guest_latency.h"
#include "plugin/image_file.h"
#include "plugin/plugin_config.h"

namespace livemig {

// One NBD operation's counters. Each sits on its own cache line so that
// requests of different kinds do not bounce one line between cores.
struct alignas(64) OpCounter {
  std::atomic<uint64_t> count{0};
  std::atomic<uint64_t> bytes{0};
  void add(uint64_t n) {
    count.fetch_add(1, std::memory_order_relaxed);
    bytes.fetch_add(n, std::memory_order_relaxed);
  }
};

struct RequestCounters {
  OpCounter pread, pwrite, flush, trim, zero, extents, cache;
  OpCounter errors;  // requests that returned an error, any kind
};

class ControlServer;
class MigrationEngine;
class PeerServer;

struct PluginState {
  PluginState();
  ~PluginState();

  PluginConfig config;
  std::optional<ImageFile> image;          // set in config_complete
  std::optional<SegmentGeometry> geometry;  // set in config_complete
  std::unique_ptr<HeatMap> heat;            // set in config_complete
  std::unique_ptr<BaseImage> base;          // base=, set in config_complete
  RequestCounters counters;
  GuestLatency guest_latency;  // reads, writes, trims, zeroes (guest-first pacing)
  std::atomic<int64_t> connections{0};
  std::chrono::steady_clock::time_point started = std::chrono::steady_clock::now();
  std::unique_ptr<MigrationEngine> engine;  // set in config_complete
  std::unique_ptr<GroupDecisions> groups;   // handover groups it coordinates; set in config_complete
  std::unique_ptr<PeerServer> peer;         // set in get_ready when listen= is given
  std::unique_ptr<ControlServer> control;   // set in get_ready when control= is given

  double uptime_seconds() const {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
  }
};

}  // namespace livemig
