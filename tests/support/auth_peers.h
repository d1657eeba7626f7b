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

#include "support/raw_socket.h"
#include "transport/auth.h"
#include "transport/context.h"

namespace shardps::testing {

// The context's refusal count once it reached `n` (a refused peer may see its refusal, e.g. a TLS
// alert, before the context counted it), or what it is after 10 s.
inline uint64_t RefusedReaching(const transport::Context& ctx, uint64_t n) {
  for (auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
       ctx.refused_peers() < n && std::chrono::steady_clock::now() < deadline;)
    usleep(5000);
  return ctx.refused_peers();
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
