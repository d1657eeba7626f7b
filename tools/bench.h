// `shardps bench`: a worker program that measures push / pull / push_pull throughput and
// latency, optionally verifying every pulled value exactly. Standalone it launches a local
// cluster of itself; under `shardps launch` it joins that job.
#pragma once

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
};

void AddBenchFlags(CLI::App* app, BenchFlags* b);
// `args` are the bench subcommand's own arguments, to re-run them under launch.
int RunBench(const BenchFlags& b, const JobFlags& job, const std::vector<std::string>& args,
             const Environment& env);

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
