// A snapshot of a process's environment, taken once where the process starts (main, or
// WorkerOptions::FromEnvironment) and handed down: nothing below the configuration code reads
// the environment itself (no getenv in libraries or transports).
#pragma once

#include <optional>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace shardps {

class Environment {
 public:
  Environment() = default;
  // Copies `envp` (NAME=VALUE entries, null-terminated; may be null).
  explicit Environment(char** envp);

  std::optional<std::string> Get(std::string_view name) const;
  bool Has(std::string_view name) const { return Get(name).has_value(); }
  // NAME=VALUE entries, as they were.
  const std::vector<std::string>& entries() const { return entries_; }
  // A null-terminated NAME=VALUE array over entries() (valid while this object lives), for
  // APIs that take an envp (WorkerOptions::FromEnvironment, execve).
  std::vector<char*> Envp() const;
  // (NAME, VALUE) of every variable whose name starts with `prefix` ("UCX_": the settings a
  // UCX context is created with).
  std::vector<std::pair<std::string, std::string>> WithPrefix(std::string_view prefix) const;

 private:
  std::vector<std::string> entries_;
};

}  // namespace shardps
