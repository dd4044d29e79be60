#include "common/tls_stream.h"

#include <sys/socket.h>

#include <cerrno>
#include <new>

#include <boost/asio/redirect_error.hpp>
#include <boost/asio/ssl/error.hpp>
#include <boost/asio/use_awaitable.hpp>
#include <boost/system/system_error.hpp>

#include <openssl/bio.h>
#include <openssl/err.h>

namespace livemig {

namespace asio = boost::asio;
using asio::awaitable;
using asio::ip::tcp;
using boost::system::error_code;

namespace {

// Records of the peer read ahead per recv: many 16 KiB records at once.
constexpr int kReadBufferBytes = 256 * 1024;

// The BIO between OpenSSL and the socket. Its data is the tcp::socket, read
// on every call: once the link closes the socket, a stale TLS call gets
// EBADF rather than a descriptor number the process has since reused.
int socket_of(BIO* b) {
  auto* socket = static_cast<tcp::socket*>(BIO_get_data(b));
  return socket->is_open() ? socket->native_handle() : -1;
}

int bio_write(BIO* b, const char* data, size_t len, size_t* written) {
  BIO_clear_retry_flags(b);
  for (;;) {
    ssize_t n = ::send(socket_of(b), data, len, MSG_NOSIGNAL);  // no SIGPIPE in migrate-nbd or livemigd
    if (n >= 0) {
      *written = static_cast<size_t>(n);
      return 1;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) BIO_set_retry_write(b);
    return 0;  // errno tells OpenSSL's caller (SSL_ERROR_SYSCALL)
  }
}

int bio_read(BIO* b, char* data, size_t len, size_t* got) {
  BIO_clear_retry_flags(b);
  for (;;) {
    ssize_t n = ::recv(socket_of(b), data, len, 0);
    if (n > 0) {
      *got = static_cast<size_t>(n);
      return 1;
    }
    if (n == 0) {
      BIO_set_flags(b, BIO_FLAGS_IN_EOF);  // BIO_eof(): the peer closed
      return 0;
    }
    if (errno == EINTR) continue;
    if (errno == EAGAIN || errno == EWOULDBLOCK) BIO_set_retry_read(b);
    return 0;
  }
}

long bio_ctrl(BIO* b, int cmd, long, void*) {
  switch (cmd) {
    case BIO_CTRL_FLUSH:
      return 1;  // nothing is buffered here
    case BIO_CTRL_EOF:
      return BIO_test_flags(b, BIO_FLAGS_IN_EOF) != 0;
    default:
      return 0;
  }
}

const BIO_METHOD* socket_method() {
  static BIO_METHOD* method = [] {
    BIO_METHOD* m = BIO_meth_new(BIO_get_new_index() | BIO_TYPE_SOURCE_SINK, "livemig asio socket");
    if (!m || !BIO_meth_set_write_ex(m, bio_write) || !BIO_meth_set_read_ex(m, bio_read) ||
        !BIO_meth_set_ctrl(m, bio_ctrl))
      throw std::bad_alloc();
    return m;
  }();
  return method;
}

}  // namespace

TlsStream::TlsStream(tcp::socket& socket, SSL_CTX* ctx) : socket_(socket) {
  ssl_ = SSL_new(ctx);
  BIO* bio = ssl_ ? BIO_new(socket_method()) : nullptr;
  if (!bio) {
    SSL_free(ssl_);
    throw std::bad_alloc();
  }
  BIO_set_data(bio, &socket_);
  BIO_set_init(bio, 1);
  SSL_set_bio(ssl_, bio, bio);  // one reference, for both directions
  // A write returns once some records are out when the socket is full, and
  // is then called again with what is left.
  SSL_set_mode(ssl_, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  SSL_set_read_ahead(ssl_, 1);
  SSL_set_default_read_buffer_len(ssl_, kReadBufferBytes);
  socket_.non_blocking(true);
}

TlsStream::~TlsStream() { SSL_free(ssl_); }

// As asio::ssl::stream reports them: OpenSSL's reason in Asio's SSL
// category, a close without close_notify as stream_truncated.
error_code TlsStream::error_of(int ret) {
  const int saved_errno = errno;
  switch (SSL_get_error(ssl_, ret)) {
    case SSL_ERROR_ZERO_RETURN:
      return asio::error::eof;
    case SSL_ERROR_SYSCALL:
      if (unsigned long e = ERR_get_error()) return error_code(static_cast<int>(e), asio::error::get_ssl_category());
      if (saved_errno != 0) return error_code(saved_errno, boost::system::system_category());
      return asio::ssl::error::stream_truncated;
    default: {
      unsigned long e = ERR_get_error();
      if (ERR_GET_REASON(e) == SSL_R_UNEXPECTED_EOF_WHILE_READING) return asio::ssl::error::stream_truncated;
      return error_code(static_cast<int>(e), asio::error::get_ssl_category());
    }
  }
}

template <class Step>
awaitable<error_code> TlsStream::drive(Step step) {
  for (;;) {
    ERR_clear_error();
    errno = 0;
    int ret = step();
    if (ret > 0) co_return error_code();
    error_code ec;
    switch (SSL_get_error(ssl_, ret)) {
      case SSL_ERROR_WANT_READ:
        co_await socket_.async_wait(tcp::socket::wait_read, asio::redirect_error(asio::use_awaitable, ec));
        break;
      case SSL_ERROR_WANT_WRITE:
        co_await socket_.async_wait(tcp::socket::wait_write, asio::redirect_error(asio::use_awaitable, ec));
        break;
      default:
        co_return error_of(ret);
    }
    if (ec) co_return ec;  // e.g. the socket was closed meanwhile
  }
}

awaitable<error_code> TlsStream::handshake(bool server) {
  co_return co_await drive([this, server] { return server ? SSL_accept(ssl_) : SSL_connect(ssl_); });
}

awaitable<void> TlsStream::read_exact(asio::mutable_buffer b) {
  auto* p = static_cast<char*>(b.data());
  size_t left = b.size();
  while (left > 0) {
    size_t got = 0;
    error_code ec = co_await drive([&] { return SSL_read_ex(ssl_, p, left, &got); });
    if (ec) throw boost::system::system_error(ec);
    p += got;
    left -= got;
  }
}

awaitable<void> TlsStream::write_all(asio::const_buffer b) {
  auto* p = static_cast<const char*>(b.data());
  size_t left = b.size();
  while (left > 0) {
    size_t wrote = 0;
    error_code ec = co_await drive([&] { return SSL_write_ex(ssl_, p, left, &wrote); });
    if (ec) throw boost::system::system_error(ec);
    p += wrote;
    left -= wrote;
  }
}

}  // namespace livemig
