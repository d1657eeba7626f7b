// `shardps launch`: a coordinator (in this process), S server processes and W copies of a
// program on this machine; prefixed output; stops everything when one part fails.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "cli.h"
#include "shardps/coordinator.h"

namespace shardps::tools {

struct LaunchOptions {
  CoordinatorOptions coordinator;  // servers, workers, mode, transport, ...
  uint32_t landing_buffers = 16;
  uint32_t apply_threads = 1;        // per server
  int64_t busy_poll_us = 200;        // servers and workers (SHARDPS_BUSY_POLL_US)
  std::vector<std::string> program;  // argv of each worker
  // Extra environment for every child ("K=V").
  std::vector<std::string> env;
  std::chrono::milliseconds grace{3000};  // SIGTERM -> SIGKILL
};

// The launch of the job `job` describes, each worker running `program`.
Result<LaunchOptions> LaunchFor(const JobFlags& job, std::vector<std::string> program);

// Runs the job; returns the exit code for the launcher (0: every worker exited 0).
int RunLaunch(const LaunchOptions& options);

// The path of the running shardps binary.
std::string SelfExe();

}  // namespace shardps::tools
