// The configuration parser: an input is a --config file (TOML/INI, [subcommand] sections) read
// by ParseLayered for an app shaped like `shardps` (global flags, two subcommands with the job
// flags), then turned into options; and, as a string, a size for ParseBytes. Errors are
// CLI::Error (a usage error) or a Status: anything else thrown, or a crash, is a bug.
#include <unistd.h>

#include <cstdlib>
#include <fstream>
#include <string>

#include <CLI/CLI.hpp>

#include "cli.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using namespace shardps;
  using namespace shardps::tools;
  const std::string text(reinterpret_cast<const char*>(data), size);
  (void)ParseBytes(text);

  static const std::string path = "/tmp/shardps-fuzz-config-" + std::to_string(getpid()) + ".toml";
  {
    std::ofstream f(path, std::ios::binary | std::ios::trunc);
    f << text;
  }
  CLI::App app{"fuzz", "shardps"};
  app.require_subcommand(1);
  std::string config, log_level{tunables::kLogLevel.default_value};
  AddTunable(&app, tunables::kConfig, &config);
  AddTunable(&app, tunables::kLogLevel, &log_level)
      ->check(CLI::IsMember({"trace", "debug", "info", "warn", "error"}));
  auto* bench = app.add_subcommand("bench", "");
  JobFlags bjob;
  bjob.Add(bench);
  auto* launch = app.add_subcommand("launch", "");
  JobFlags ljob;
  ljob.Add(launch);
  std::string arg0 = "shardps", arg1 = "--config", arg3 = "bench";
  std::string arg2 = path;
  char* argv[] = {arg0.data(), arg1.data(), arg2.data(), arg3.data(), nullptr};
  try {
    ParseLayered(app, 4, argv);
  } catch (const CLI::Error&) {
    return 0;  // a usage error, reported as such
  }
  auto co = bjob.ToCoordinator();
  uint64_t a = 0, b = 0;
  (void)bjob.InboundBytes(&a, &b);
  (void)co;
  return 0;
}
