// Shared pieces of the `shardps` subcommands: common flags and their SHARDPS_* variables.
#pragma once

#include <CLI/CLI.hpp>
#include <string>

#include "shardps/coordinator.h"

namespace shardps::tools {

// Flags that describe a job (used by coordinator, launch, bench, train). Strings are parsed
// after CLI11 is done, so that errors name the flag.
struct JobFlags {
  uint32_t servers = 1;
  uint32_t workers = 1;
  std::string mode = "sync";
  std::string aggregate = "mean";
  std::string transport = "tcp";
  std::string chunk_size = "4MiB";
  uint32_t landing_buffers = 16;
  uint32_t apply_threads = 1;
  int64_t busy_poll_us = 200;
  int64_t register_timeout_ms = 60000;
  int64_t heartbeat_interval_ms = 500;
  int64_t heartbeat_timeout_ms = 5000;

  void Add(CLI::App* app, bool with_sizes = true);
  Result<CoordinatorOptions> ToCoordinator() const;
};

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
