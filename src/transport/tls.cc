#include "transport/tls.h"

#include <openssl/err.h>
#include <openssl/ssl.h>
#include <poll.h>

#include <cerrno>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "transport/wait_fd.h"

namespace shardps::transport {
namespace {

// OpenSSL's error queue as text (and emptied), for messages.
std::string OpenSslErrors() {
  std::string out;
  unsigned long e;
  while ((e = ERR_get_error()) != 0) {
    char buf[256];
    ERR_error_string_n(e, buf, sizeof(buf));
    if (!out.empty()) out += "; ";
    out += buf;
  }
  return out.empty() ? "no reason given" : out;
}

}  // namespace

Result<std::shared_ptr<TlsConfig>> TlsConfig::Load(const TlsFiles& files) {
  if (files.cert.empty() || files.key.empty() || files.ca.empty())
    return Status::InvalidArgument(
        "TLS needs all of --tls-cert, --tls-key and --tls-ca (this node's certificate, its key, "
        "and the CA that signs every node)");
  std::shared_ptr<TlsConfig> c(new TlsConfig());
  ERR_clear_error();
  c->ctx_ = SSL_CTX_new(TLS_method());
  if (!c->ctx_) return Status::Internal("SSL_CTX_new: " + OpenSslErrors());
  SSL_CTX_set_min_proto_version(c->ctx_, TLS1_3_VERSION);
  if (SSL_CTX_use_certificate_chain_file(c->ctx_, files.cert.c_str()) != 1)
    return Status::InvalidArgument(
        fmt::format("TLS certificate '{}': {}", files.cert, OpenSslErrors()));
  if (SSL_CTX_use_PrivateKey_file(c->ctx_, files.key.c_str(), SSL_FILETYPE_PEM) != 1)
    return Status::InvalidArgument(fmt::format("TLS key '{}': {}", files.key, OpenSslErrors()));
  // (A key of another certificate is refused above already: "key values mismatch".)
  if (SSL_CTX_check_private_key(c->ctx_) != 1)
    return Status::InvalidArgument(
        fmt::format("TLS key '{}' does not match the certificate '{}'", files.key, files.cert));
  if (SSL_CTX_load_verify_locations(c->ctx_, files.ca.c_str(), nullptr) != 1)
    return Status::InvalidArgument(fmt::format("TLS CA '{}': {}", files.ca, OpenSslErrors()));
  // Both sides present a certificate the CA signed; nothing else is checked (nodes are reached
  // by address, not by a name in their certificate).
  SSL_CTX_set_verify(c->ctx_, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, nullptr);
  SSL_CTX_set_mode(c->ctx_, SSL_MODE_ENABLE_PARTIAL_WRITE | SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER);
  SSL_CTX_set_num_tickets(c->ctx_, 0);
  // A peer that closes without close_notify (a refusal, a crash) reads as a close.
  SSL_CTX_set_options(c->ctx_,
                      SSL_OP_IGNORE_UNEXPECTED_EOF);  // connections are long-lived: no resumption
  return c;
}

Result<std::shared_ptr<const TlsConfig>> TlsForRole(const TlsFiles& files,
                                                    const std::string& role) {
  if (!files.enabled()) return std::shared_ptr<const TlsConfig>();
  auto c = TlsConfig::Load(files);
  if (!c.ok()) return c.status().WithContext(role);
  spdlog::info("{}: tcp connections use TLS 1.3 (certificate '{}', CA '{}')", role, files.cert,
               files.ca);
  return std::shared_ptr<const TlsConfig>(std::move(c).value());
}

TlsConfig::~TlsConfig() {
  if (ctx_) SSL_CTX_free(ctx_);
}

Result<std::unique_ptr<TlsSession>> TlsSession::Create(const TlsConfig& config, int fd,
                                                       bool client) {
  std::unique_ptr<TlsSession> s(new TlsSession());
  ERR_clear_error();
  s->ssl_ = SSL_new(config.ctx());
  if (!s->ssl_) return Status::Internal("SSL_new: " + OpenSslErrors());
  s->fd_ = fd;
  SSL_set_fd(s->ssl_, fd);
  if (client)
    SSL_set_connect_state(s->ssl_);
  else
    SSL_set_accept_state(s->ssl_);
  return s;
}

TlsSession::~TlsSession() {
  if (ssl_) SSL_free(ssl_);  // the socket is the connection's to close
}

Result<TlsSession::Step> TlsSession::Handshake() {
  ERR_clear_error();
  int r = SSL_do_handshake(ssl_);
  if (r == 1) return Step::kDone;
  int e = SSL_get_error(ssl_, r);
  if (e == SSL_ERROR_WANT_READ) return Step::kWantRead;
  if (e == SSL_ERROR_WANT_WRITE) return Step::kWantWrite;
  std::string why = OpenSslErrors();
  long verify = SSL_get_verify_result(ssl_);
  if (verify != X509_V_OK)
    why =
        fmt::format("the peer's certificate: {} ({})", X509_verify_cert_error_string(verify), why);
  else if (e == SSL_ERROR_SYSCALL || e == SSL_ERROR_ZERO_RETURN)
    why = "the peer closed the connection during the TLS handshake (" + why + ")";
  return Status::Unauthenticated("TLS handshake failed: " + why);
}

Status TlsSession::HandshakeUntil(std::chrono::steady_clock::time_point deadline) {
  for (;;) {
    auto step = Handshake();
    if (!step.ok()) return step.status();
    if (*step == Step::kDone) return Status::OK();
    SHARDPS_RETURN_IF_ERROR(WaitFd(fd_, *step == Step::kWantRead ? POLLIN : POLLOUT, deadline,
                                   "TLS handshake not complete in time"));
  }
}

ssize_t TlsSession::Send(const iovec* iov, int count) {
  ssize_t total = 0;
  for (int i = 0; i < count; ++i) {
    if (iov[i].iov_len == 0) continue;
    ERR_clear_error();
    int r = SSL_write(ssl_, iov[i].iov_base,
                      static_cast<int>(std::min<size_t>(iov[i].iov_len, 1 << 30)));
    if (r > 0) {
      total += r;
      if (static_cast<size_t>(r) < iov[i].iov_len) break;
      continue;
    }
    if (total > 0) return total;
    int e = SSL_get_error(ssl_, r);
    errno = (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) ? EAGAIN
            : e == SSL_ERROR_SYSCALL && errno != 0                  ? errno
                                                                    : EPROTO;
    return -1;
  }
  return total;
}

ssize_t TlsSession::Recv(void* buf, size_t len) {
  ERR_clear_error();
  int r = SSL_read(ssl_, buf, static_cast<int>(std::min<size_t>(len, 1 << 30)));
  if (r > 0) return r;
  int e = SSL_get_error(ssl_, r);
  if (e == SSL_ERROR_ZERO_RETURN) return 0;
  if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
    errno = EAGAIN;
    return -1;
  }
  if (e == SSL_ERROR_SYSCALL && errno == 0) return 0;  // closed without close_notify
  if (e != SSL_ERROR_SYSCALL) errno = EPROTO;
  return -1;
}

bool TlsSession::HasPending() const { return SSL_pending(ssl_) > 0; }

Status TlsSession::SendAll(const void* buf, size_t n,
                           std::chrono::steady_clock::time_point deadline) {
  size_t off = 0;
  while (off < n) {
    iovec v{const_cast<uint8_t*>(static_cast<const uint8_t*>(buf)) + off, n - off};
    ssize_t w = Send(&v, 1);
    if (w > 0) {
      off += static_cast<size_t>(w);
    } else if (errno == EAGAIN) {
      SHARDPS_RETURN_IF_ERROR(WaitFd(fd_, POLLOUT, deadline, "TLS send timed out"));
    } else {
      return Status::FromErrno("TLS send", errno);
    }
  }
  return Status::OK();
}

Status TlsSession::RecvExactly(void* buf, size_t n,
                               std::chrono::steady_clock::time_point deadline) {
  size_t off = 0;
  while (off < n) {
    ssize_t r = Recv(static_cast<uint8_t*>(buf) + off, n - off);
    if (r > 0) {
      off += static_cast<size_t>(r);
    } else if (r == 0) {
      return Status::Unauthenticated(
          "the peer closed the connection during authentication: it does not hold this cluster "
          "secret, or runs without --secret");
    } else if (errno == EAGAIN) {
      if (HasPending()) continue;
      SHARDPS_RETURN_IF_ERROR(WaitFd(fd_, POLLIN, deadline,
                                     "the peer did not authenticate in time (does it run with "
                                     "the same --secret?)"));
    } else {
      return Status::FromErrno("TLS receive", errno);
    }
  }
  return Status::OK();
}

}  // namespace shardps::transport
