// `shardps launch`: a coordinator (in this process), S server processes and W copies of a
// program on this machine; prefixed output; stops everything when one part fails.
#pragma once

#include <chrono>
#include <string>
#include <vector>

#include "cli.h"
#include "core/environment.h"
#include "shardps/coordinator.h"

namespace shardps::tools {

struct LaunchOptions {
  CoordinatorOptions coordinator;  // servers, workers, mode, transport, ...
  uint32_t landing_buffers = static_cast<uint32_t>(tunables::kLandingBuffers.number);
  uint32_t apply_threads = static_cast<uint32_t>(tunables::kApplyThreads.number);  // per server
  std::string device{tunables::kDevice.default_value};                             // servers
  std::string restore;  // a checkpoint the servers start from (SHARDPS_RESTORE, absolute)
  int64_t busy_poll_us = tunables::kBusyPollUs.number;  // servers and workers
  uint64_t connection_inbound_bytes = static_cast<uint64_t>(tunables::kConnectionInbound.number);
  uint64_t process_inbound_bytes = static_cast<uint64_t>(tunables::kProcessInbound.number);
  std::vector<std::string> program;  // argv of each worker
  // The environment every child inherits ("K=V"), then extra entries for every child.
  std::vector<std::string> parent_env;
  std::vector<std::string> env;
  std::chrono::milliseconds grace{3000};  // SIGTERM -> SIGKILL
  // --restart-workers: a worker process that dies (other than worker 0) is started again with its
  // rank, this many times in all; with --on-worker-loss continue it rejoins the job.
  uint32_t restart_workers = 0;
  // --restart-servers: with replicas, a server process that dies is replaced by a new one that
  // joins the running job (docs/fault-tolerance.md, "A server that joins"), this many times.
  uint32_t restart_servers = 0;
  // --timeline: each server and worker writes FILE.server<i>.json / FILE.worker<r>.json, merged
  // into FILE when the job ends.
  std::string timeline;
  // Node-level reduction: each run of this many workers is one node (docs/node-reduction.md).
  uint32_t workers_per_node = 1;
};

// The launch of the job `job` describes, each worker running `program`.
// `parent` is the launcher's environment, which the children inherit.
Result<LaunchOptions> LaunchFor(const JobFlags& job, std::vector<std::string> program,
                                const Environment& parent);

// The variables every server and worker of the job gets ("K=V"): the coordinator's address,
// the job's transport, sizes and mode, and the tunables they read, then `options.env`.
std::vector<std::string> ChildEnvironment(const LaunchOptions& options,
                                          const std::string& coordinator);

// The metrics address of task `task` of a job whose --metrics-listen is `listen` (the
// coordinator's): host:(P + 1 + task); unchanged when empty or its port is 0 (each picks one).
std::string MetricsListenFor(const std::string& listen, int64_t task);

// `parent` ("K=V") with `extra` on top: an entry of `extra` replaces the parent's of the same
// name (a lookup takes the first match, so appending would let the parent's win).
std::vector<std::string> MergeEnvironment(const std::vector<std::string>& parent,
                                          const std::vector<std::string>& extra);

// Runs the job; returns the exit code for the launcher (0: every worker exited 0).
int RunLaunch(const LaunchOptions& options);

// The path of the running shardps binary.
std::string SelfExe();

}  // namespace shardps::tools
