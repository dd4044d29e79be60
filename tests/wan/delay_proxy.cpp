// lm-delay-proxy: a TCP proxy that adds a one-way delay to each direction,
// the WAN of the test bed (issue #15: netem is not available here).
//
//   lm-delay-proxy --listen ADDR:PORT --to ADDR:PORT --delay-ms D [--max-buffer BYTES]
//
// Every accepted connection gets one to --to; bytes read from either side
// are written to the other D ms after they were read, in order. Each
// direction buffers at most --max-buffer bytes (default 64 MiB; at 1 Gbit/s
// and 100 ms one-way 12.5 MB are in flight): when full, it stops reading, so
// TCP's flow control pushes back on the sender as a long link would. The
// link's rate is the test bed's tbf; this adds only latency. One thread, one
// io_context; a closed side closes the other once its queue is written.
#include <utility>  // before Asio: its awaitable.hpp uses std::exchange

#include <boost/asio.hpp>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <string>
#include <vector>

namespace asio = boost::asio;
using asio::awaitable;
using asio::ip::tcp;
using asio::use_awaitable;
using Clock = std::chrono::steady_clock;

namespace {

struct Options {
  tcp::endpoint listen, to;
  std::chrono::microseconds delay{0};
  size_t max_buffer = 64u << 20;
};

tcp::endpoint parse_endpoint(const std::string& s) {
  auto colon = s.rfind(':');
  if (colon == std::string::npos) throw std::runtime_error("want ADDR:PORT, got " + s);
  return {asio::ip::make_address(s.substr(0, colon)), static_cast<unsigned short>(std::stoi(s.substr(colon + 1)))};
}

// One direction: a reader that stamps chunks, a writer that sends each
// chunk once its time has come.
struct Pipe {
  struct Chunk {
    Clock::time_point due;
    std::vector<char> bytes;
  };
  std::deque<Chunk> queue;
  size_t queued = 0;
  bool eof = false;
  asio::steady_timer wake;  // the writer waits on it; the reader cancels it
  asio::steady_timer room;  // the reader waits on it when the queue is full
  explicit Pipe(asio::any_io_executor ex) : wake(ex, Clock::time_point::max()), room(ex, Clock::time_point::max()) {}
};

// Both sockets and both directions of one proxied connection; each of its
// four coroutines holds it.
struct Conn {
  tcp::socket client, server;
  Pipe up, down;  // client -> server, server -> client
  explicit Conn(tcp::socket c) : client(std::move(c)), server(client.get_executor()), up(client.get_executor()),
                                 down(client.get_executor()) {}
};

awaitable<void> read_side(std::shared_ptr<Conn> c, tcp::socket& from, Pipe& p, Options o) {
  try {
    for (;;) {
      while (p.queued >= o.max_buffer) {
        p.room.expires_at(Clock::time_point::max());
        boost::system::error_code ec;
        co_await p.room.async_wait(asio::redirect_error(use_awaitable, ec));
      }
      std::vector<char> buf(256 * 1024);
      size_t n = co_await from.async_read_some(asio::buffer(buf), use_awaitable);
      buf.resize(n);
      p.queued += n;
      p.queue.push_back({Clock::now() + o.delay, std::move(buf)});
      p.wake.cancel();
    }
  } catch (const std::exception&) {
  }
  p.eof = true;
  p.wake.cancel();
}

awaitable<void> write_side(std::shared_ptr<Conn> c, tcp::socket& to, Pipe& p) {
  try {
    for (;;) {
      if (p.queue.empty()) {
        if (p.eof) break;
        p.wake.expires_at(Clock::time_point::max());
        boost::system::error_code ec;
        co_await p.wake.async_wait(asio::redirect_error(use_awaitable, ec));
        continue;
      }
      if (Clock::now() < p.queue.front().due) {
        p.wake.expires_at(p.queue.front().due);
        boost::system::error_code ec;
        co_await p.wake.async_wait(asio::redirect_error(use_awaitable, ec));
        continue;
      }
      Pipe::Chunk chunk = std::move(p.queue.front());
      p.queue.pop_front();
      co_await asio::async_write(to, asio::buffer(chunk.bytes), use_awaitable);
      p.queued -= chunk.bytes.size();
      p.room.cancel();
    }
  } catch (const std::exception&) {
  }
  boost::system::error_code ec;
  to.shutdown(tcp::socket::shutdown_send, ec);
}

awaitable<void> serve(tcp::socket client, Options o) {
  auto c = std::make_shared<Conn>(std::move(client));
  try {
    co_await c->server.async_connect(o.to, use_awaitable);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lm-delay-proxy: connecting to the target: %s\n", e.what());
    co_return;
  }
  c->client.set_option(tcp::no_delay(true));
  c->server.set_option(tcp::no_delay(true));
  auto ex = c->client.get_executor();
  asio::co_spawn(ex, read_side(c, c->client, c->up, o), asio::detached);
  asio::co_spawn(ex, write_side(c, c->server, c->up), asio::detached);
  asio::co_spawn(ex, read_side(c, c->server, c->down, o), asio::detached);
  asio::co_spawn(ex, write_side(c, c->client, c->down), asio::detached);
}

awaitable<void> accept_loop(tcp::acceptor acceptor, Options o) {
  for (;;) {
    tcp::socket s = co_await acceptor.async_accept(use_awaitable);
    asio::co_spawn(acceptor.get_executor(), serve(std::move(s), o), asio::detached);
  }
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  bool have_listen = false, have_to = false;
  try {
    for (int i = 1; i < argc; ++i) {
      std::string a = argv[i];
      auto value = [&]() -> std::string {
        if (i + 1 >= argc) throw std::runtime_error(a + " needs a value");
        return argv[++i];
      };
      if (a == "--listen") {
        o.listen = parse_endpoint(value());
        have_listen = true;
      } else if (a == "--to") {
        o.to = parse_endpoint(value());
        have_to = true;
      } else if (a == "--delay-ms") {
        o.delay = std::chrono::microseconds(static_cast<int64_t>(std::stod(value()) * 1000));
      } else if (a == "--max-buffer") {
        o.max_buffer = std::stoull(value());
      } else if (a == "-h" || a == "--help") {
        std::puts("usage: lm-delay-proxy --listen ADDR:PORT --to ADDR:PORT --delay-ms D [--max-buffer BYTES]\n"
                  "Forwards TCP connections, each direction D ms late (the test bed's WAN).");
        return 0;
      } else {
        throw std::runtime_error("unknown argument " + a);
      }
    }
    if (!have_listen || !have_to) throw std::runtime_error("--listen and --to are required");
    asio::io_context io;
    tcp::acceptor acceptor(io, o.listen);
    asio::co_spawn(io, accept_loop(std::move(acceptor), o), asio::detached);
    std::printf("lm-delay-proxy: %s:%u -> %s:%u, %.1f ms each way\n", o.listen.address().to_string().c_str(),
                o.listen.port(), o.to.address().to_string().c_str(), o.to.port(), o.delay.count() / 1000.0);
    std::fflush(stdout);
    io.run();
  } catch (const std::exception& e) {
    std::fprintf(stderr, "lm-delay-proxy: %s\n", e.what());
    return 2;
  }
  return 0;
}
