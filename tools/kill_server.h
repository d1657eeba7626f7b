// `--kill-server-at` of shardps bench and train (docs/fault-tolerance.md): worker 0 kills a
// server of a job whose processes run on this host, to show the job going on with its chunks'
// backups.
#pragma once

#include <signal.h>
#include <unistd.h>

#include <fstream>
#include <string>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "shardps/worker.h"

namespace shardps::tools {

// Sends `sig` (SIGKILL, or SIGSTOP: a hung host) to the process of `server`, found through its
// stats (pid and host); an error when it runs on another host or its stats do not say. Returns
// its pid.
inline Result<int> KillServerProcess(Worker& w, uint32_t server, int sig = SIGKILL) {
  auto js = w.ServerStats(server);
  if (!js.ok()) return js.status().WithContext(fmt::format("stats of server {}", server));
  auto j = nlohmann::json::parse(*js, nullptr, false);
  if (j.is_discarded() || !j.contains("pid") || !j.contains("host"))
    return Status::Internal(fmt::format("server {} did not say its pid and host", server));
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  if (j["host"].get<std::string>() != host)
    return Status::InvalidArgument(fmt::format(
        "server {} runs on {}, not on this host ({}): --kill-server-at kills a local process",
        server, j["host"].get<std::string>(), host));
  const int pid = j["pid"].get<int>();
  if (pid <= 1 || kill(pid, sig) != 0)
    return Status::FromErrno(fmt::format("signalling server {} (pid {})", server, pid), errno);
  if (sig == SIGSTOP) {
    // A thread of it that was running answers what it had in hand before it stops: wait (at
    // most 2 s) until the process is seen stopped, so that what follows finds it silent.
    for (int i = 0; i < 2000; ++i) {
      std::ifstream stat("/proc/" + std::to_string(pid) + "/stat");
      std::string line;
      std::getline(stat, line);
      const auto close = line.rfind(')');
      if (close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'T') break;
      usleep(1000);
    }
  }
  return pid;
}

}  // namespace shardps::tools
