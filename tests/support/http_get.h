// A plain HTTP/1.0 GET over a blocking socket (for scraping /metrics and /healthz in tests),
// and reading one sample out of Prometheus' text format.
#pragma once

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <cstdlib>
#include <initializer_list>
#include <optional>
#include <sstream>
#include <string>
#include <thread>

#include "support/raw_socket.h"

namespace shardps::testing {

struct HttpReply {
  int status = 0;  // 0: no answer
  std::string body;
};

inline HttpReply HttpGet(const std::string& address, const std::string& path,
                         int timeout_ms = 10000) {
  HttpReply out;
  int fd = RawConnect(address);
  if (fd < 0) return out;
  std::string req = "GET " + path + " HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n";
  if (send(fd, req.data(), req.size(), MSG_NOSIGNAL) != static_cast<ssize_t>(req.size())) {
    close(fd);
    return out;
  }
  std::string all;
  char buf[65536];
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) <= 0) break;
    ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) break;
    all.append(buf, static_cast<size_t>(n));
  }
  close(fd);
  // "HTTP/1.1 200 OK\r\n...\r\n\r\nbody"
  if (all.rfind("HTTP/", 0) != 0) return out;
  out.status = std::atoi(all.c_str() + all.find(' ') + 1);
  size_t body = all.find("\r\n\r\n");
  if (body != std::string::npos) out.body = all.substr(body + 4);
  return out;
}

// The value of the first sample of `name` whose labels contain every fragment in `labels`
// (e.g. `op="push"`); nullopt when there is none.
inline std::optional<double> Sample(const std::string& text, const std::string& name,
                                    std::initializer_list<std::string> labels = {}) {
  std::istringstream in(text);
  std::string line;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '#') continue;
    if (line.rfind(name, 0) != 0) continue;
    char next = line.size() > name.size() ? line[name.size()] : '\0';
    if (next != '{' && next != ' ') continue;
    bool all = true;
    for (const auto& l : labels) all = all && line.find(l) != std::string::npos;
    if (!all) continue;
    return std::strtod(line.c_str() + line.rfind(' ') + 1, nullptr);
  }
  return std::nullopt;
}

// Polls `/metrics` at `address` until sample `name` equals `want` or `timeout` passed; returns
// the last value seen (nullopt when there was none).
inline std::optional<double> WaitForSample(const std::string& address, const std::string& name,
                                           double want, std::chrono::milliseconds timeout) {
  std::optional<double> seen;
  for (auto until = std::chrono::steady_clock::now() + timeout;
       seen != want && std::chrono::steady_clock::now() < until;) {
    seen = Sample(HttpGet(address, "/metrics").body, name);
    if (seen != want) std::this_thread::sleep_for(std::chrono::milliseconds(2));
  }
  return seen;
}

}  // namespace shardps::testing
