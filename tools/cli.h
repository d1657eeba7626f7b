// Shared pieces of the `shardps` subcommands: common flags and their SHARDPS_* variables.
#pragma once

#include <signal.h>

#include <chrono>
#include <string>

#include <spdlog/spdlog.h>
#include <CLI/CLI.hpp>

#include "shardps/coordinator.h"
#include "shardps/tunables.h"

namespace shardps::tools {

// Adds the flag of tunable `t` (include/shardps/tunables.h) to `app`: --NAME, its variable
// and its help from the table; `var` keeps the value it has (its default).
template <typename T>
CLI::Option* AddTunable(CLI::App* app, const Tunable& t, T* var) {
  return app->add_option("--" + std::string(t.name), *var, std::string(t.help))
      ->envname(std::string(t.env));
}

// Flags that describe a job (used by coordinator, launch, bench, train), with the defaults of
// the tunables table. Strings are parsed after CLI11 is done, so that errors name the flag.
struct JobFlags {
  uint32_t servers = static_cast<uint32_t>(tunables::kServers.number);
  uint32_t workers = static_cast<uint32_t>(tunables::kWorkers.number);
  std::string mode{tunables::kMode.default_value};
  std::string aggregate{tunables::kAggregate.default_value};
  uint32_t sync_quorum = static_cast<uint32_t>(tunables::kSyncQuorum.number);
  uint32_t replicas = static_cast<uint32_t>(tunables::kReplicas.number);
  std::string on_worker_loss{tunables::kOnWorkerLoss.default_value};
  uint32_t restart_workers = 0;
  uint32_t restart_servers = 0;
  std::string worker_weights{tunables::kWorkerWeights.default_value};
  std::string weight_rule{tunables::kWeightRule.default_value};
  std::string transport{tunables::kTransport.default_value};
  std::string chunk_size{tunables::kChunkSize.default_value};
  uint32_t landing_buffers = static_cast<uint32_t>(tunables::kLandingBuffers.number);
  uint32_t apply_threads = static_cast<uint32_t>(tunables::kApplyThreads.number);
  std::string device{tunables::kDevice.default_value};
  std::string restore{tunables::kRestore.default_value};
  int64_t checkpoint_interval_s = tunables::kCheckpointIntervalS.number;
  std::string checkpoint_dir{tunables::kCheckpointDir.default_value};
  int64_t busy_poll_us = tunables::kBusyPollUs.number;
  int64_t register_timeout_ms = tunables::kRegisterTimeoutMs.number;
  int64_t heartbeat_interval_ms = tunables::kHeartbeatIntervalMs.number;
  int64_t heartbeat_timeout_ms = tunables::kHeartbeatTimeoutMs.number;
  int64_t failover_timeout_ms = tunables::kFailoverTimeoutMs.number;
  std::string connection_inbound{tunables::kConnectionInbound.default_value};
  std::string process_inbound{tunables::kProcessInbound.default_value};
  std::string fuse_bytes{tunables::kFuseBytes.default_value};
  int64_t fuse_us = tunables::kFuseUs.number;
  uint32_t workers_per_node = static_cast<uint32_t>(tunables::kWorkersPerNode.number);
  std::string node_reducer{tunables::kNodeReducer.default_value};
  std::string secret_file{tunables::kSecretFile.default_value};
  std::string metrics_listen{tunables::kMetricsListen.default_value};
  std::string timeline{tunables::kTimeline.default_value};
  std::string tls_cert, tls_key, tls_ca;

  void Add(CLI::App* app, bool with_sizes = true);
  Result<CoordinatorOptions> ToCoordinator() const;
  // The inbound budgets in bytes (errors name the flag).
  Status InboundBytes(uint64_t* per_connection, uint64_t* per_process) const;
};

// Waits for a long-running role (coordinator, server) to end: `wait(timeout)` returns OK when
// it ended, Timeout while it goes on, another error when it failed (logged, exit code 1). Also
// ends on SIGINT/SIGTERM (blocked by main, read with sigtimedwait): exit code 130.
template <typename WaitFn>
int ServeUntilDone(WaitFn wait) {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  for (;;) {
    Status st = wait(std::chrono::milliseconds(200));
    if (st.ok()) return 0;
    if (!st.IsTimeout()) {
      spdlog::error("{}", st.ToString());
      return 1;
    }
    timespec zero{0, 0};
    if (sigtimedwait(&set, nullptr, &zero) > 0) {
      spdlog::warn("interrupted; stopping");
      return 130;
    }
  }
}

// "4MiB", "64KiB", "1GiB", "4096" -> bytes.
Result<uint64_t> ParseBytes(const std::string& s);

// Parses argv with the precedence flags > SHARDPS_* variables > config file. The file
// (TOML/INI, given by --config or SHARDPS_CONFIG) holds `key = value` lines, at top level for
// global flags or under [subcommand]; an unknown key is an error. Throws CLI::ParseError like
// CLI::App::parse.
void ParseLayered(CLI::App& app, int argc, char** argv);

// Logs the effective configuration of `app` (flags, environment and config file merged).
void LogEffectiveConfig(const CLI::App& app);

}  // namespace shardps::tools
