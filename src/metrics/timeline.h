// `--timeline FILE`: a Chrome trace (Trace Event Format, JSON) of what a role did, viewable in
// Perfetto (ui.perfetto.dev) or chrome://tracing (docs/metrics.md). Workers record each push,
// pull and push_pull from start to completion and each Handle::Wait; servers each push they
// fold in (and the optimizer step it completes). Each process writes its own file when its
// role ends; `shardps launch` merges its processes' files into FILE.
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "shardps/status.h"

namespace shardps::metrics {

// A span's arguments: up to three numbers and one text, each under a literal key. The text
// is shared (a tensor's name, escaped once for JSON with JsonEscape).
struct SpanArgs {
  const char* keys[3] = {nullptr, nullptr, nullptr};
  int64_t values[3] = {0, 0, 0};
  const char* text_key = nullptr;
  std::shared_ptr<const std::string> text;
};

class Timeline {
 public:
  using Clock = std::chrono::steady_clock;
  // At most this many spans are kept; later ones are counted as dropped (said in the file).
  static constexpr size_t kMaxSpans = 2'000'000;

  // Records into memory; writes `path` on Write() (or destruction). `process` names the
  // process's track ("worker 0"); `pid` orders the tracks.
  Timeline(std::string path, std::string process, uint32_t pid, size_t max_spans = kMaxSpans);
  ~Timeline();

  using Args = SpanArgs;

  // Thread-safe and cheap (no formatting until Write): `tid` groups spans into rows (a chunk,
  // a tensor).
  void Span(const char* name, const char* category, Clock::time_point start, Clock::time_point end,
            uint64_t tid, Args args = {});
  size_t spans() const;
  uint64_t dropped() const;
  // Writes the trace file now (once; later calls do nothing).
  Status Write();
  const std::string& path() const { return path_; }

 private:
  struct Event {
    const char* name;
    const char* category;
    int64_t ts_ns;  // since epoch_ (wall clock of the start)
    int64_t dur_ns;
    uint64_t tid;
    Args args;
  };
  const std::string path_, process_;
  const uint32_t pid_;
  const size_t max_spans_;
  // Steady times are turned into wall-clock microseconds, so that the files of processes on
  // different hosts line up (as well as their clocks do).
  const Clock::time_point steady0_ = Clock::now();
  const int64_t wall0_us_;
  mutable std::mutex mu_;
  std::deque<Event> events_;  // guarded by mu_ (a deque: growing never copies what is there)
  uint64_t dropped_ = 0;      // guarded by mu_
  bool written_ = false;      // guarded by mu_
};

// Merges Chrome trace files (each an object with "traceEvents") into one at `out`.
Status MergeTimelines(const std::vector<std::string>& parts, const std::string& out);

// JSON string escaping for span arguments.
std::string JsonEscape(const std::string& s);

}  // namespace shardps::metrics
