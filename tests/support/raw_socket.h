// Blocking loopback sockets for tests that speak to ShardPS's ports byte by byte (hostile
// peers, handshakes, HTTP).
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdint>
#include <string>

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
  // The host as given (tests listen on loopback, or on an RDMA interface's address).
  if (inet_pton(AF_INET, host.c_str(), &a.sin_addr) != 1)
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

}  // namespace shardps::testing
