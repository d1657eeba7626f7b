// Blocking waits on one socket with a deadline, for the handshakes that run before a
// connection is handed to its loop (the cluster secret's, TLS's).
#pragma once

#include <poll.h>

#include <cerrno>
#include <chrono>
#include <string>

#include "shardps/status.h"

namespace shardps::transport {

// Waits until fd is ready for `events` (POLLIN, POLLOUT); Timeout(`what`) once the deadline
// passed.
inline Status WaitFd(int fd, short events, std::chrono::steady_clock::time_point deadline,
                     const std::string& what) {
  for (;;) {
    auto left = std::chrono::duration_cast<std::chrono::milliseconds>(
        deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) return Status::Timeout(what);
    pollfd p{fd, events, 0};
    int r = poll(&p, 1, static_cast<int>(left.count()));
    if (r > 0) return Status::OK();
    if (r < 0 && errno != EINTR) return Status::FromErrno("poll", errno);
  }
}

}  // namespace shardps::transport
