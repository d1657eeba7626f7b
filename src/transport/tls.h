// Optional TLS on tcp connections (docs/security.md): TLS 1.3 with certificates both ways
// (mutual TLS), every peer's certificate checked against the cluster's CA. OpenSSL, in user
// space (these kernels have no kernel TLS); the handshake runs before the cluster secret's, and
// then every byte of the connection, frames and one-sided transfers alike, is encrypted.
#pragma once

#include <sys/uio.h>

#include <chrono>
#include <memory>
#include <string>

#include "shardps/status.h"

typedef struct ssl_st SSL;
typedef struct ssl_ctx_st SSL_CTX;

namespace shardps::transport {

// The files of a node's TLS identity. All three or none.
struct TlsFiles {
  std::string cert;  // PEM: this node's certificate (chain)
  std::string key;   // PEM: its private key
  std::string ca;    // PEM: the CA that signs every node of the cluster
  bool enabled() const { return !cert.empty() || !key.empty() || !ca.empty(); }
};

// An OpenSSL context for both sides of connections: shared by a process's contexts.
class TlsConfig {
 public:
  // Loads and checks the files: InvalidArgument naming the file and OpenSSL's reason.
  static Result<std::shared_ptr<TlsConfig>> Load(const TlsFiles& files);
  ~TlsConfig();
  SSL_CTX* ctx() const { return ctx_; }

 private:
  TlsConfig() = default;
  SSL_CTX* ctx_ = nullptr;
};

// A role's TLS from its files: none when no file is given (null), loaded and logged otherwise.
Result<std::shared_ptr<const TlsConfig>> TlsForRole(const TlsFiles& files, const std::string& role);

// One connection's TLS state over a non-blocking socket.
class TlsSession {
 public:
  // A session on `fd` as the connecting (client) or accepting (server) side.
  static Result<std::unique_ptr<TlsSession>> Create(const TlsConfig& config, int fd, bool client);
  ~TlsSession();

  enum class Step { kDone, kWantRead, kWantWrite };
  // Advances the handshake; an error says why it failed (a certificate the CA did not sign,
  // a peer that does not speak TLS, ...).
  Result<Step> Handshake();
  // Blocks (poll) until the handshake completed or the deadline passed.
  Status HandshakeUntil(std::chrono::steady_clock::time_point deadline);

  // As sendmsg/recv on a non-blocking socket: bytes moved, or -1 with errno EAGAIN (try again
  // when the socket is ready) or another errno; recv returns 0 when the peer closed.
  ssize_t Send(const iovec* iov, int count);
  ssize_t Recv(void* buf, size_t len);
  // Decrypted bytes OpenSSL holds that the socket will not signal again.
  bool HasPending() const;
  // Blocking helpers for the handshake that follows TLS (the cluster secret's), until the
  // deadline: exactly n bytes each.
  Status SendAll(const void* buf, size_t n, std::chrono::steady_clock::time_point deadline);
  Status RecvExactly(void* buf, size_t n, std::chrono::steady_clock::time_point deadline);

 private:
  TlsSession() = default;
  SSL* ssl_ = nullptr;
  int fd_ = -1;
};

}  // namespace shardps::transport
