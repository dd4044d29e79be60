// TLS over a connected Asio TCP socket, for the peer link: OpenSSL reads
// and writes the socket itself (through a BIO over recv/send), Asio only
// waits for readiness (async_wait) when OpenSSL would block.
//
// Why not boost::asio::ssl::stream: it moves every TLS record through a
// 17 KiB memory BIO pair and one asynchronous operation per record, so a
// migration's 1 MiB frames cost 64 trips through the io loop each. Measured
// on loopback (tests/bench/migration --tls psk,off and a 1 GiB loopback
// migration), that made TLS cost up to about 2x the CPU of plain text. Here one
// write of a frame writes all its records in one call, and a read takes
// many records per recv (read-ahead into a 256 KiB buffer). On the 1 Gbit/s
// bench the plugins' CPU with TLS against plain text went from 1.63x to
// 1.22x (guest writing unthrottled) and from 1.25x to 1.10x (2000 IOPS).
//
// Like asio::ssl::stream, one read and one write may be outstanding at once,
// from coroutines on one thread (the link's io thread); no call may run
// concurrently with another from a second thread.
#pragma once

#include <memory>
#include <utility>  // Boost 1.74's awaitable.hpp uses std::exchange without it

#include <boost/asio/awaitable.hpp>
#include <boost/asio/buffer.hpp>
#include <boost/asio/ip/tcp.hpp>
#include <boost/system/error_code.hpp>

#include <openssl/ssl.h>

namespace livemig {

class TlsStream {
 public:
  // A TLS session over `socket` (which must outlive it) with the settings
  // of `ctx`. Throws std::bad_alloc if OpenSSL cannot allocate one.
  TlsStream(boost::asio::ip::tcp::socket& socket, SSL_CTX* ctx);
  ~TlsStream();
  TlsStream(const TlsStream&) = delete;
  TlsStream& operator=(const TlsStream&) = delete;

  SSL* native_handle() { return ssl_; }

  // The TLS handshake, as server or client. Errors are in Asio's SSL
  // category (their message is OpenSSL's reason, e.g. "wrong version
  // number"), or the socket's.
  boost::asio::awaitable<boost::system::error_code> handshake(bool server);
  // Exactly these bytes; throw boost::system::system_error (asio::error::eof
  // when the peer closed cleanly, ssl::error::stream_truncated when it
  // closed without saying so).
  boost::asio::awaitable<void> read_exact(boost::asio::mutable_buffer b);
  boost::asio::awaitable<void> write_all(boost::asio::const_buffer b);

 private:
  // Runs `step` (an SSL_* call returning > 0 on success) until it succeeds,
  // waiting for the socket whenever OpenSSL would block.
  template <class Step>
  boost::asio::awaitable<boost::system::error_code> drive(Step step);
  boost::system::error_code error_of(int ret);

  boost::asio::ip::tcp::socket& socket_;
  SSL* ssl_ = nullptr;
};

}  // namespace livemig
