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

// The last `lines` lines of `text`: where a failed command's output says what went wrong (put
// first in a failure message, as CI shows the head of a failing test's output).
inline std::string LastLines(const std::string& text, size_t lines) {
  if (lines == 0) return {};
  size_t at = text.size();
  if (at > 0 && text[at - 1] == '\n') --at;  // the final newline ends the last line
  for (size_t n = 0; n < lines; ++n) {
    const size_t nl = at == 0 ? std::string::npos : text.rfind('\n', at - 1);
    if (nl == std::string::npos) return text;
    at = nl;
  }
  return text.substr(at + 1);
}

}  // namespace shardps::testing
