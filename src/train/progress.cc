#include "train/progress.h"

#include <algorithm>
#include <cmath>
#include <utility>

#include <fmt/format.h>

namespace shardps::train {
namespace {

constexpr auto kRedrawInterval = std::chrono::milliseconds(100);
constexpr int kBarWidth = 30;

std::string Duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "--:--";
  const auto s = static_cast<long long>(seconds + 0.5);
  if (s >= 3600) return fmt::format("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60);
  return fmt::format("{:02}:{:02}", s / 60, s % 60);
}

std::string Rate(double per_second) {
  if (per_second >= 1e6) return fmt::format("{:.2f}M", per_second / 1e6);
  if (per_second >= 1e3) return fmt::format("{:.1f}k", per_second / 1e3);
  return fmt::format("{:.0f}", per_second);
}

}  // namespace

Progress::Progress(std::FILE* out, bool is_tty, std::string label, size_t total)
    : out_(out),
      is_tty_(is_tty && out != nullptr),
      label_(std::move(label)),
      total_(total),
      start_(Clock::now()),
      last_draw_(start_) {}

Progress::~Progress() { Finish(); }

void Progress::Update(size_t done, double loss) {
  if (!is_tty_ || finished_) return;
  done_ = std::min(done, total_);
  loss_ = loss;
  const auto now = Clock::now();
  if (drawn_ && now - last_draw_ < kRedrawInterval && done_ < total_) return;
  last_draw_ = now;
  Draw();
}

void Progress::Finish() {
  if (!is_tty_ || finished_) return;
  finished_ = true;
  if (!drawn_) return;
  Draw();
  std::fputc('\n', out_);
  std::fflush(out_);
}

void Progress::Draw() {
  drawn_ = true;
  const double elapsed = std::chrono::duration<double>(Clock::now() - start_).count();
  const double frac = total_ > 0 ? static_cast<double>(done_) / static_cast<double>(total_) : 1;
  const int filled = static_cast<int>(frac * kBarWidth);
  const double rate = elapsed > 0 ? static_cast<double>(done_) / elapsed : 0;
  const double eta = rate > 0 ? static_cast<double>(total_ - done_) / rate : NAN;
  const std::string line = fmt::format(
      "\r{} [{}{}] {:3.0f}% {}/{} {} samples/s loss {:.4f} {} {}\x1b[K", label_,
      std::string(filled, '#'), std::string(kBarWidth - filled, '.'), frac * 100, done_, total_,
      Rate(rate), loss_, done_ < total_ ? "ETA" : "in", Duration(done_ < total_ ? eta : elapsed));
  std::fputs(line.c_str(), out_);
  std::fflush(out_);
}

}  // namespace shardps::train
