// What the migration engine needs from the plugin (EngineContext), and what
// the engine's parts share (EngineServices): the image, its geometry and
// heat, the gate, the phase machine, the measures, the work pools, and a way
// to open a peer link whose frames the engine routes.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include <boost/asio/io_context.hpp>

#include "common/heat_map.h"
#include "common/migration_params.h"
#include "common/peer_auth.h"
#include "common/peer_link.h"
#include "common/segment_geometry.h"
#include "common/status.h"
#include "common/tls_context.h"
#include "plugin/base_image.h"
#include "plugin/block_sender.h"
#include "plugin/engine_stats.h"
#include "plugin/guest_latency.h"
#include "plugin/image_file.h"
#include "plugin/io_gate.h"
#include "plugin/latency_pacer.h"
#include "plugin/phase_machine.h"
#include "plugin/work_pool.h"

namespace livemig {

// When a plugin accepts START (becomes a destination).
enum class AcceptIncoming {
  Empty,   // only onto an image with no data, no client write since start,
           // or its own earlier partial copy (the default)
  Always,  // onto any image that is not in a migration: the operator says
           // its contents may be overwritten
  Never,   // never: this plugin is not a migration destination
};
const char* accept_incoming_name(AcceptIncoming a);
Result<AcceptIncoming> parse_accept_incoming(const std::string& s);

struct EngineContext {
  ImageFile* image = nullptr;
  const SegmentGeometry* geometry = nullptr;
  std::unique_ptr<HeatMap>* heat_slot = nullptr;  // the plugin's, replaced by resize_image
  Secret secret;
  std::shared_ptr<TlsContext> tls;  // null: plaintext peer links
  std::string state_path;
  std::string listen;  // our peer address as configured (may be empty)
  HandoverPolicy handover_policy = HandoverPolicy::Explicit;
  AcceptIncoming accept_incoming = AcceptIncoming::Empty;
  std::chrono::milliseconds peer_timeout{15000};
  std::string node_name = "livemig";
  // Grows an empty image to the source's size (a destination that started on
  // an empty or missing image). Rebuilds the geometry in place.
  std::function<Status(uint64_t)> resize_image;
  // Called about once a second on the engine's thread (heat decay).
  std::function<void()> tick;
  // NBD clients connected now, and writes they made since the plugin started
  // (a destination refuses to overwrite an image a guest is using).
  std::function<int64_t()> connections = [] { return int64_t{0}; };
  std::function<uint64_t()> client_writes = [] { return uint64_t{0}; };
  // The base image both hosts hold (base=; null: none).
  const BaseImage* base = nullptr;
  // The guest's request latency here (null: not measured, no pacing).
  const GuestLatency* guest_latency = nullptr;
  // Where the engine reports what happens (nbdkit_debug in the plugin).
  std::function<void(const std::string&)> log = [](const std::string&) {};
};

// Replies wait at most this long for the peer (START, HANDOVER, SUMS).
inline constexpr auto kReplyTimeout = std::chrono::seconds(60);
inline constexpr auto kConnectTimeout = std::chrono::seconds(10);

struct EngineServices {
  EngineContext& ctx;
  boost::asio::io_context& io;
  IoGate& gate;
  PhaseMachine& machine;
  EngineStats& stats;
  WorkPool& disk_pool;
  BlockSender& sender;
  // Connects to HOST:PORT as a peer; the link is started, its frames and its
  // close go to the engine, which hands them to the session that owns it.
  std::function<Result<std::shared_ptr<PeerLink>>(const std::string& address)> connect;
  // One control request to the plugin at HOST:PORT (CONTROL frames, this
  // side's key): its JSON reply. A handover group's coordinator is asked so.
  std::function<Result<nlohmann::json>(const std::string& address, const nlohmann::json& request)> control;

  const SegmentGeometry& geometry() const { return *ctx.geometry; }
  ImageFile& image() const { return *ctx.image; }
  HeatMap& heat() const { return **ctx.heat_slot; }
  // A migration's transfer pacing: max_rate, and the guest-first bound.
  // probe_every: see LatencyPacer (the destination probes; the source
  // measured its baseline itself).
  PacerConfig pacer_config(const MigrationParams& p, unsigned probe_every = 0) const {
    return {.bound = p.guest_latency_bound, .min_rate = p.min_rate, .max_rate = p.max_rate,
            .baseline_p99_ns = p.guest_baseline_p99_ns, .baseline_requests = p.guest_baseline_requests,
            .probe_every = probe_every, .max_slowdown = p.max_slowdown};
  }
  void log(const std::string& m) const { ctx.log(m); }
};

}  // namespace livemig
