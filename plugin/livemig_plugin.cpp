// livemig.so: the nbdkit callbacks. Each livemig_<callback> is a thin shim over
// PluginState / ImageFile: it counts the request, records heat, does the I/O,
// and turns a failure into nbdkit_error + nbdkit_set_error(errno). No C++
// exception crosses into nbdkit.
#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <cerrno>
#include <cinttypes>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <memory>
#include <string>
#include <string_view>

#include <fmt/format.h>

#include "common/version.h"
#include "common/peer_auth.h"
#include "plugin/control_ops.h"
#include "plugin/group_decisions.h"
#include "common/control_server.h"
#include "plugin/migration_engine.h"
#include "plugin/peer_server.h"
#include "plugin/plugin_state.h"

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

namespace livemig {

PluginState::PluginState() = default;
PluginState::~PluginState() = default;

namespace {

std::unique_ptr<PluginState> g_state;

PluginState& state() { return *g_state; }

// Reports a failed request: the message with errno's text, the errno to the
// client, and the error counter.
int fail(const char* what, uint64_t count, uint64_t offset) {
  int err = errno ? errno : EIO;
  nbdkit_error("%s: count=%" PRIu64 " offset=%" PRIu64 ": %s", what, count, offset, std::strerror(err));
  nbdkit_set_error(err);
  state().counters.errors.add(0);
  return -1;
}

// Runs a callback body, turning an escaping exception into an NBD error.
template <typename Fn>
int guarded(const char* what, Fn&& fn) {
  try {
    return fn();
  } catch (const std::bad_alloc&) {
    nbdkit_error("%s: out of memory", what);
    nbdkit_set_error(ENOMEM);
  } catch (const std::exception& e) {
    nbdkit_error("%s: %s", what, e.what());
    nbdkit_set_error(EIO);
  }
  return -1;
}

// Grows an empty destination image to the source's size: the file, the
// geometry (rebuilt in place, so pointers to it stay valid) and the heat map.
// Only ever called while the image is empty, so no request can be using them.
// Everything that can fail (the heat map's allocation for a size the peer
// chose, the file's resize) happens before anything is replaced: a failure
// leaves the old geometry and heat map together.
Status resize_image(uint64_t size) {
  PluginState& st = state();
  auto geometry = SegmentGeometry::make(size, st.config.block_size, st.config.segment_size_for(size));
  if (!geometry) return geometry.status();
  std::unique_ptr<HeatMap> heat;
  try {
    heat = std::make_unique<HeatMap>(*geometry, st.config.heat_half_life);
  } catch (const std::bad_alloc&) {
    return Status::error(fmt::format("cannot track an image of {} bytes: out of memory", size), ENOMEM);
  }
  if (st.image->resize(size) < 0)
    return Status::error(std::string("resizing the image: ") + std::strerror(errno), errno);
  st.geometry.emplace(*geometry);
  st.heat = std::move(heat);
  return Status::ok();
}

Status make_engine(PluginState& st) {
  EngineContext ctx;
  ctx.image = &*st.image;
  ctx.geometry = &*st.geometry;
  ctx.heat_slot = &st.heat;
  ctx.state_path = st.config.state_file.empty() ? StateFile::path_for_image(st.config.image) : st.config.state_file;
  ctx.listen = st.config.listen;
  ctx.handover_policy = st.config.handover;
  ctx.accept_incoming = st.config.accept_incoming;
  ctx.guest_latency = &g_state->guest_latency;
  ctx.connections = [] { return g_state->connections.load(std::memory_order_relaxed); };
  ctx.client_writes = [] {
    const RequestCounters& c = g_state->counters;
    return c.pwrite.count.load() + c.trim.count.load() + c.zero.count.load();
  };
  ctx.peer_timeout = std::chrono::milliseconds(static_cast<int64_t>(st.config.peer_timeout * 1000));
  ctx.resize_image = resize_image;
  ctx.tick = [] { g_state->heat->decay_tick(g_state->uptime_seconds()); };
  ctx.log = [](const std::string& m) { nbdkit_debug("%s", m.c_str()); };
  if (!st.config.base.empty()) {
    auto base = BaseImage::open(st.config.base, static_cast<uint32_t>(st.config.block_size), ctx.log);
    if (!base) return base.status();
    st.base = std::move(*base);
    ctx.base = st.base.get();
    nbdkit_debug("base image %s: identity %s", st.base->path().c_str(), st.base->identity().c_str());
  }
  std::string warning;
  if (!st.config.secret.empty()) {
    ctx.secret = std::move(st.config.secret);  // secret=+FILE, -FD or -: read in .config
  } else if (!st.config.secret_path.empty()) {
    auto secret = load_secret(st.config.secret_path, &warning);
    if (!secret) return secret.status();
    ctx.secret = std::move(*secret);
  } else if (!st.config.listen.empty()) {
    // No key is fixed or shared by default: a random one, in a 0600 file
    // beside the state (loopback only, checked in config_complete). Who can
    // read that file can control this plugin; nobody else. (Without
    // listen= and secret= there is no key: such a plugin cannot migrate.)
    st.config.secret_path = generated_key_path(st.config, ctx.state_path);
    bool created = false;
    auto secret = load_or_create_secret(st.config.secret_path, &created, &warning);
    if (!secret) return secret.status();
    if (created) nbdkit_debug("made a random key in %s (mode 0600)", st.config.secret_path.c_str());
    ctx.secret = std::move(*secret);
  }
  if (!warning.empty()) nbdkit_error("warning: %s", warning.c_str());
  if (st.config.tls.enabled().value()) {
    auto tls = TlsContext::make(st.config.tls);
    if (!tls) return tls.status();
    ctx.tls = std::move(*tls);
  } else if (!st.config.listen.empty() && st.config.tls.mode == TlsMode::Off &&
             !is_loopback_host(parse_host_port(st.config.listen, true).value().host)) {
    nbdkit_error("warning: tls=off on listen=%s: the disk crosses the network in clear text", st.config.listen.c_str());
  }
  // Group decisions this plugin records as a coordinator: beside the state
  // file (IMAGE.livemig-groups by default).
  const std::string& sp = ctx.state_path;
  const std::string suffix = ".livemig-state";
  st.groups = std::make_unique<GroupDecisions>(
      sp.size() > suffix.size() && sp.ends_with(suffix) ? GroupDecisions::path_for_image(sp.substr(0, sp.size() - suffix.size()))
                                                        : sp + ".groups");
  st.engine = std::make_unique<MigrationEngine>(std::move(ctx));
  return st.engine->recover();
}

void livemig_load() { g_state = std::make_unique<PluginState>(); }

void livemig_unload() {
  if (g_state && g_state->engine) g_state->engine->stop();
  g_state.reset();
}

// Reports a failed step to nbdkit; 0 if it succeeded.
int report(const Status& s) {
  if (s) return 0;
  nbdkit_error("%s", s.message().c_str());
  return -1;
}

// nbdkit's own parsers, so that a size, a boolean or a password reads as in
// every nbdkit plugin (and a bad one gets nbdkit's message).
constexpr NbdkitParsers kNbdkitParsers{nbdkit_parse_size, nbdkit_parse_bool, nbdkit_read_password};

int livemig_config(const char* key, const char* value) {
  return guarded("config", [&] {
    // File paths are made absolute here, against the directory nbdkit was
    // started in: without -f nbdkit changes directory to / when it forks, and
    // the image's state file, the control socket (removed at exit) and the
    // secret are used after that. secret=+FILE keeps its +; secret=-FD and
    // secret=- name no path.
    std::string_view k(key);
    bool path = k == "image" || k == "control" || k == "secret" || k == "state-file" || k == "tls-certificates" ||
                k == "tls-psk";
    std::string v;
    if (k == "secret" && value[0] == '-') path = false;
    if (k == "secret" && value[0] == '+') {
      v = "+";
      ++value;
    }
    if (path && *value) {
      char* p = nbdkit_absolute_path(value);
      if (!p) return -1;  // nbdkit_absolute_path reported it
      v += p;
      free(p);
    } else {
      v += value;
    }
    return report(state().config.set(key, v, kNbdkitParsers));
  });
}

// Checks the keys together, opens the image and builds the engine.
Status complete_config(PluginState& st) {
  if (Status s = st.config.complete(); !s) return s;
  // With a peer port this may become a migration destination, which can
  // start on a missing image and take its size from the source.
  auto image = ImageFile::open(st.config.image, st.config.readonly, !st.config.listen.empty());
  if (!image) return image.status();
  auto geometry =
      SegmentGeometry::make(image->size(), st.config.block_size, st.config.segment_size_for(image->size()));
  if (!geometry) return geometry.status();
  st.image.emplace(std::move(*image));
  st.geometry.emplace(*geometry);
  st.heat = std::make_unique<HeatMap>(*st.geometry, st.config.heat_half_life);
  return make_engine(st);
}

int livemig_config_complete() {
  return guarded("config", [&] { return report(complete_config(state())); });
}

// Binds the peer port and the control socket (system calls only, no thread).
Status bind_endpoints(PluginState& st) {
  if (!st.config.listen.empty()) {
    HostPort where = parse_host_port(st.config.listen, true).value();
    auto peer = PeerServer::bind(where);
    if (!peer) return peer.status();
    st.peer = std::move(*peer);
    where.port = st.peer->port();
    st.engine->set_listen_address(where.str());
  }
  if (st.config.control_path.empty()) return Status::ok();
  auto server = ControlServer::bind(st.config.control_path, [](std::string_view line) {
    return handle_control_request(*g_state, line);
  });
  if (!server) return server.status();
  st.control = std::move(*server);
  return Status::ok();
}

// Binds before nbdkit forks, so a bad address or path stops start-up.
int livemig_get_ready() {
  return guarded("get_ready", [&] { return report(bind_endpoints(state())); });
}

// Threads start here, after nbdkit has forked into the background.
int livemig_after_fork() {
  return guarded("after_fork", [&] {
    PluginState& st = state();
    st.engine->start();
    if (st.peer) {
      PeerLink::Options opts;
      opts.read_timeout = std::chrono::milliseconds(static_cast<int64_t>(st.config.peer_timeout * 1000));
      opts.tls = st.engine->tls();
      auto secret = st.engine->secret();
      st.peer->start(
          st.engine->io(), secret, opts, [](const std::shared_ptr<PeerLink>& link) { g_state->engine->on_peer_link(link); },
          [](std::string_view line) { return handle_control_request(*g_state, line); }, &st.engine->control_pool(),
          [](const std::string& m) { nbdkit_error("%s", m.c_str()); });
    }
    if (st.control) {
      st.control->start(nullptr,
                        std::chrono::milliseconds(1000));
    }
    return 0;
  });
}

void livemig_cleanup() {
  if (!g_state) return;
  if (g_state->control) g_state->control->stop();
  if (g_state->engine) g_state->engine->stop();
  g_state->peer.reset();
}

void* livemig_open(int readonly) {
  state().connections.fetch_add(1, std::memory_order_relaxed);
  return NBDKIT_HANDLE_NOT_NEEDED;
}

void livemig_close(void*) {
  if (state().connections.fetch_sub(1, std::memory_order_relaxed) == 1) state().engine->on_last_client_closed();
}

int64_t livemig_get_size(void*) { return static_cast<int64_t>(state().image->size()); }

int livemig_can_write(void*) { return !state().config.readonly; }
int livemig_can_flush(void*) { return 1; }
int livemig_can_trim(void*) { return 1; }
int livemig_can_zero(void*) { return 1; }
int livemig_can_fast_zero(void*) { return 1; }
int livemig_can_fua(void*) { return NBDKIT_FUA_NATIVE; }
int livemig_can_multi_conn(void*) { return 1; }  // one fd; flush syncs all of it
int livemig_can_extents(void*) { return 1; }
int livemig_can_cache(void*) { return NBDKIT_CACHE_NATIVE; }

int livemig_block_size(void*, uint32_t* minimum, uint32_t* preferred, uint32_t* maximum) {
  *minimum = 1;
  *preferred = static_cast<uint32_t>(state().geometry->block_size());
  *maximum = 0xffffffff;
  return 0;
}

int livemig_pread(void*, void* buf, uint32_t count, uint64_t offset, uint32_t flags) {
  PluginState& st = state();
  RequestTimer timer(st.guest_latency);
  if (st.engine->read(buf, count, offset) < 0) return fail("pread", count, offset);
  st.counters.pread.add(count);
  st.heat->record_read(offset, count);
  return 0;
}

int livemig_pwrite(void*, const void* buf, uint32_t count, uint64_t offset, uint32_t flags) {
  PluginState& st = state();
  RequestTimer timer(st.guest_latency);
  const uint32_t fua = flags & NBDKIT_FLAG_FUA ? kForwardFua : 0;
  ForwardPayload request{ForwardOp::Write, fua, offset, count, {static_cast<const uint8_t*>(buf), count}};
  if (st.engine->change(request) < 0) return fail("pwrite", count, offset);
  st.counters.pwrite.add(count);
  st.heat->record_write(offset, count);
  return 0;
}

int livemig_flush(void*, uint32_t flags) {
  PluginState& st = state();
  if (st.engine->flush() < 0) return fail("flush", 0, 0);
  st.counters.flush.add(0);
  return 0;
}

int livemig_trim(void*, uint32_t count, uint64_t offset, uint32_t flags) {
  PluginState& st = state();
  RequestTimer timer(st.guest_latency);
  const uint32_t fua = flags & NBDKIT_FLAG_FUA ? kForwardFua : 0;
  if (st.engine->change(ForwardPayload{ForwardOp::Trim, fua, offset, count, {}}) < 0) return fail("trim", count, offset);
  st.counters.trim.add(count);
  st.heat->record_write(offset, count);
  return 0;
}

int livemig_zero(void*, uint32_t count, uint64_t offset, uint32_t flags) {
  PluginState& st = state();
  RequestTimer timer(st.guest_latency);
  const bool fast = flags & NBDKIT_FLAG_FAST_ZERO;
  const uint32_t request_flags =
      (flags & NBDKIT_FLAG_FUA ? kForwardFua : 0) | (flags & NBDKIT_FLAG_MAY_TRIM ? kForwardMayTrim : 0);
  if (st.engine->change(ForwardPayload{ForwardOp::Zero, request_flags, offset, count, {}}, fast) < 0) {
    if (fast && errno == ENOTSUP) {  // expected answer to a fast-zero probe, not a failure
      nbdkit_set_error(ENOTSUP);
      return -1;
    }
    return fail("zero", count, offset);
  }
  st.counters.zero.add(count);
  st.heat->record_write(offset, count);
  return 0;
}

int livemig_extents(void*, uint32_t count, uint64_t offset, uint32_t flags, struct nbdkit_extents* extents) {
  PluginState& st = state();
  const bool req_one = flags & NBDKIT_FLAG_REQ_ONE;
  IoMode mode = st.engine->io_mode();
  if (mode == IoMode::DestProxy || mode == IoMode::DestPost) {
    // The local image misses blocks the source has: a local hole may be data
    // there, so claim none (clients then read instead of skipping).
    if (nbdkit_add_extent(extents, offset, count, 0) < 0) return -1;
    st.counters.extents.add(0);
    return 0;
  }
  int add_failed = 0;
  int rc = st.image->extents(count, offset, [&](uint64_t off, uint64_t len, bool hole) {
    uint32_t type = hole ? (NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO) : 0;
    if (nbdkit_add_extent(extents, off, len, type) < 0) {
      add_failed = 1;
      return false;
    }
    return !req_one;
  });
  if (add_failed) return -1;  // nbdkit_add_extent already reported it
  if (rc < 0) return fail("extents", count, offset);
  st.counters.extents.add(0);
  return 0;
}

int livemig_cache(void*, uint32_t count, uint64_t offset, uint32_t flags) {
  PluginState& st = state();
  // Advisory: ask the kernel to read ahead; failure to advise is no error.
  (void)posix_fadvise(st.image->fd(), offset, count, POSIX_FADV_WILLNEED);
  st.counters.cache.add(count);
  return 0;
}

void livemig_dump_plugin() {
  printf("livemig_block_size_default=%u\n", SegmentGeometry::kDefaultBlockSize);
  printf("livemig_segment_size_default=%llu\n",  // up to 64G; 1/65536 of the image above
         static_cast<unsigned long long>(SegmentGeometry::kDefaultSegmentSize));
}

nbdkit_plugin make_plugin() {
  nbdkit_plugin p{};
  p.name = "livemig";
  p.longname = "livemig live storage migration plugin";
  p.version = kVersion;
  p.description = "Serves a local raw image, tracks segment heat, and migrates it live to a peer.";
  p.load = livemig_load;
  p.unload = livemig_unload;
  p.config = livemig_config;
  p.config_complete = livemig_config_complete;
  p.config_help = kConfigHelp;
  p.magic_config_key = "image";
  p.get_ready = livemig_get_ready;
  p.after_fork = livemig_after_fork;
  p.cleanup = livemig_cleanup;
  p.open = livemig_open;
  p.close = livemig_close;
  p.get_size = livemig_get_size;
  p.block_size = livemig_block_size;
  p.can_write = livemig_can_write;
  p.can_flush = livemig_can_flush;
  p.can_trim = livemig_can_trim;
  p.can_zero = livemig_can_zero;
  p.can_fast_zero = livemig_can_fast_zero;
  p.can_fua = livemig_can_fua;
  p.can_multi_conn = livemig_can_multi_conn;
  p.can_extents = livemig_can_extents;
  p.can_cache = livemig_can_cache;
  p.pread = livemig_pread;
  p.pwrite = livemig_pwrite;
  p.flush = livemig_flush;
  p.trim = livemig_trim;
  p.zero = livemig_zero;
  p.extents = livemig_extents;
  p.cache = livemig_cache;
  p.dump_plugin = livemig_dump_plugin;
  p.errno_is_preserved = 0;
  return p;
}

nbdkit_plugin plugin = make_plugin();

}  // namespace
}  // namespace livemig

using livemig::plugin;
NBDKIT_REGISTER_PLUGIN(plugin)
