// `shardps checkpoint`: asks a running job's coordinator for a checkpoint of it
// (docs/fault-tolerance.md, "Checkpoints of a running job") and waits until it is written.
#pragma once

#include <chrono>
#include <string>

#include <CLI/CLI.hpp>

#include "shardps/status.h"

namespace shardps::tools {

struct CheckpointFlags {
  std::string coordinator;  // host:port
  std::string dir;
  int64_t timeout_ms = 120000;
  int64_t connect_timeout_ms = 10000;
  std::string secret_file;
  std::string tls_cert, tls_key, tls_ca;
};

void AddCheckpointFlags(CLI::App* app, CheckpointFlags* f);
// What was written ("generation 3 in /ckpt: 12 chunks from 2 servers"), or why not.
Result<std::string> RequestCheckpoint(const CheckpointFlags& f);
int RunCheckpoint(const CheckpointFlags& f);

}  // namespace shardps::tools
