// A one-line progress display for long loops (e.g. one training epoch).
#pragma once

#include <chrono>
#include <cstddef>
#include <cstdio>
#include <string>

namespace shardps::train {

// On a terminal, redraws a single line ("\r") with a bar, samples/s, the latest loss and an ETA,
// at most ~10 times a second. Elsewhere (a log file, a pipe) it prints nothing: the caller logs
// one line per epoch instead.
class Progress {
 public:
  Progress(std::FILE* out, bool is_tty, std::string label, size_t total);
  ~Progress();  // calls Finish()
  Progress(const Progress&) = delete;
  Progress& operator=(const Progress&) = delete;

  // `done` of `total` samples processed so far; `loss` is the latest (e.g. running mean) loss.
  void Update(size_t done, double loss);
  // Draws the final state and ends the line; later calls (and Update) do nothing.
  void Finish();

 private:
  using Clock = std::chrono::steady_clock;
  void Draw();

  std::FILE* out_;
  bool is_tty_;
  std::string label_;
  size_t total_;
  size_t done_ = 0;
  double loss_ = 0.0;
  bool drawn_ = false, finished_ = false;
  Clock::time_point start_, last_draw_;
};

}  // namespace shardps::train
