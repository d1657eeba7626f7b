// Peers that do not belong, for the tests of the cluster secret (docs/security.md): raw sockets
// and a relay that records a legitimate handshake so that it can be replayed.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <future>
#include <string>
#include <vector>

#include <gtest/gtest.h>

#include "transport/auth.h"
#include "transport/context.h"

namespace shardps::testing {

// A blocking socket connected to 127.0.0.1:port of `address`; -1 when refused.
inline int RawConnect(const std::string& address) {
  std::string host;
  uint16_t port = 0;
  if (!transport::ParseHostPort(address, &host, &port).ok()) return -1;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
    close(fd);
    return -1;
  }
  return fd;
}

// Reads exactly n bytes within timeout_ms; false on close, error or timeout.
inline bool RecvAll(int fd, uint8_t* buf, size_t n, int timeout_ms = 10000) {
  size_t got = 0;
  while (got < n) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) <= 0) return false;
    ssize_t r = recv(fd, buf + got, n - got, 0);
    if (r <= 0) return false;
    got += static_cast<size_t>(r);
  }
  return true;
}

inline bool SendAll(int fd, const uint8_t* buf, size_t n) {
  return send(fd, buf, n, MSG_NOSIGNAL) == static_cast<ssize_t>(n);
}

// Reads until the peer closes; returns how many bytes came, or -1 when it was still open after
// timeout_ms.
inline int64_t BytesUntilClosed(int fd, int timeout_ms = 10000) {
  int64_t total = 0;
  char buf[4096];
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) <= 0) return -1;
    ssize_t r = recv(fd, buf, sizeof(buf), 0);
    if (r <= 0) return total;
    total += r;
  }
}

// A client holding `secret` proves it to `target` through a relay that passes the bytes both
// ways (as any router may); returns what the client sent: its hello and its proof. Empty when
// the relayed handshake did not succeed.
inline std::vector<uint8_t> RecordHandshake(const std::string& target, const std::string& secret) {
  using namespace std::chrono_literals;
  constexpr size_t kHello = transport::auth::kHelloBytes, kProof = transport::auth::kProofBytes;
  int lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof(a);
  if (bind(lfd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0 || listen(lfd, 1) != 0 ||
      getsockname(lfd, reinterpret_cast<sockaddr*>(&a), &len) != 0) {
    close(lfd);
    return {};
  }
  std::string relay = "127.0.0.1:" + std::to_string(ntohs(a.sin_port));
  auto client = std::async(std::launch::async, [relay, secret] {
    transport::ContextOptions o;
    o.name = "recorded-client";
    o.secret = secret;
    auto ctx = transport::CreateContext("tcp", o);
    if (!ctx.ok()) return false;
    auto c = (*ctx)->Connect(relay, {}, 10s);
    if (!c.ok()) return false;
    (*c)->Close();
    return true;
  });
  std::vector<uint8_t> sent(kHello + kProof);
  bool ok = false;
  pollfd p{lfd, POLLIN, 0};
  if (poll(&p, 1, 10000) == 1) {
    int cfd = accept(lfd, nullptr, nullptr);
    int sfd = RawConnect(target);
    uint8_t hello[kHello], proof[kProof];
    ok = cfd >= 0 && sfd >= 0 && RecvAll(sfd, hello, kHello) && SendAll(cfd, hello, kHello) &&
         RecvAll(cfd, sent.data(), sent.size()) && SendAll(sfd, sent.data(), sent.size()) &&
         RecvAll(sfd, proof, kProof) && SendAll(cfd, proof, kProof);
    ok = client.get() && ok;
    if (sfd >= 0) close(sfd);
    if (cfd >= 0) close(cfd);
  }
  close(lfd);
  if (!ok) return {};
  return sent;
}

// Replays a recorded hello and proof on a new connection to `target`: true when the target
// answered with its own hello only and closed the connection (refused), false when it sent a
// proof back or kept the connection open.
inline bool ReplayIsRefused(const std::string& target, const std::vector<uint8_t>& recorded) {
  int fd = RawConnect(target);
  if (fd < 0) return false;
  uint8_t hello[transport::auth::kHelloBytes];
  bool ok = RecvAll(fd, hello, sizeof(hello)) && SendAll(fd, recorded.data(), recorded.size()) &&
            BytesUntilClosed(fd) == 0;
  close(fd);
  return ok;
}

}  // namespace shardps::testing
