// `shardps bench`: a worker program that measures push / pull / push_pull throughput and
// latency, optionally verifying every pulled value exactly. Standalone it launches a local
// cluster of itself; under `shardps launch` it joins that job.
#pragma once

#include <netinet/in.h>

#include <string>
#include <vector>

#include "cli.h"
#include "core/environment.h"

namespace shardps::tools {

struct BenchFlags {
  std::string op = "pushpull";
  std::string size = "4MiB";
  uint32_t tensors = 1;
  uint32_t iters = 20;
  uint32_t warmup = 2;
  bool verify = false;
  std::string report;
  std::string compression = "none";       // Compression::Parse
  std::string pull_compression = "none";  // none, fp16, bf16
  bool no_baseline = false;               // the suite measures its own
  std::string suite;                      // quick or full: the scenarios of bench_suite.cc
  std::string plot_dir;                   // the suite's PNGs
  // Worker 0 SIGKILLs server 0 before this iteration (counting the warm-up ones from 1); 0: no
  // (replication: docs/fault-tolerance.md).
  uint32_t kill_server_at = 0;
  // kill: SIGKILL; stop: SIGSTOP, and SIGCONT once that iteration completed (a paused server
  // that comes back after it was replaced: fenced).
  std::string kill_server_how = "kill";
  // After --kill-server-at: every worker meets before this iteration; worker 0 waits until every
  // chunk has a backup again (new backups: docs/fault-tolerance.md), then SIGKILLs server 1.
  uint32_t kill_second_server_at = 0;
  // The last worker SIGKILLs itself before this iteration (counting the warm-up ones from 1); 0:
  // no (--on-worker-loss continue: docs/fault-tolerance.md). --verify then expects its pushes
  // until it died and, in sync mode, each step's mean over its contributors.
  uint32_t kill_worker_at = 0;
  // How long one operation, barrier or the wait for new backups may take before the bench fails
  // (printing what every server says of itself).
  uint32_t wait_timeout_s = 120;
};

void AddBenchFlags(CLI::App* app, BenchFlags* b);
// `args` are the bench subcommand's own arguments, to re-run them under launch.
int RunBench(const BenchFlags& b, const JobFlags& job, const std::vector<std::string>& args,
             const Environment& env);

// `shardps bench --suite quick|full` (tools/bench_suite.cc): every scenario as its own job,
// repeated, with same-run baselines; a JSON report and PNGs when asked. Exit status 0 unless a
// run or a baseline failed.
int RunBenchSuite(const std::string& suite, const std::string& report, const std::string& plot_dir);

// A listening TCP socket on 127.0.0.1 at a free port (backlog 1), its address in `addr`: the
// baselines' server side.
Result<int> ListenOnLoopback(sockaddr_in* addr);

// Raw TCP stream throughput between two processes on loopback, in Gbit/s.
Result<double> MeasureTcpStreamGbps(uint64_t bytes);

// One ucx_perftest run (server and client processes on 127.0.0.1, the environment's UCX_TLS):
// bandwidth in Gbit/s and per-operation latency (average overhead) in microseconds.
struct PerftestResult {
  double gbps = 0;
  double latency_us = 0;
};
Result<PerftestResult> RunUcxPerftest(const std::string& test, uint64_t size, uint32_t iters);

}  // namespace shardps::tools
