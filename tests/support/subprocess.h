// The tests' view of core/subprocess.h (RunCommand with a hard deadline), plus helpers for
// reading what a command printed.
#pragma once

#include <string>

#include "core/subprocess.h"

namespace shardps::testing {

using shardps::CommandResult;
using shardps::RunCommand;

inline size_t CountOccurrences(const std::string& hay, const std::string& needle) {
  size_t n = 0;
  for (size_t at = hay.find(needle); at != std::string::npos; at = hay.find(needle, at + 1)) ++n;
  return n;
}

}  // namespace shardps::testing
