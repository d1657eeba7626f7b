// A budget of bytes for buffers that hold what peers sent and the process has not handed on yet
// (frames being received, messages waiting to be delivered in order). Charged as the bytes
// arrive, not as a peer claims them: a frame header that claims 2 GiB costs nothing until the
// bytes come. A connection that would exceed its own budget or the process's is closed with a
// logged error; the process goes on serving. Thread-safe.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>

namespace shardps::transport {

class InboundBudget {
 public:
  explicit InboundBudget(uint64_t limit) : limit_(limit) {}

  // Takes n bytes; false (nothing taken) when that would exceed the limit.
  bool TryCharge(uint64_t n) {
    uint64_t cur = used_.load(std::memory_order_relaxed);
    do {
      if (n > limit_ || cur > limit_ - n) return false;
    } while (!used_.compare_exchange_weak(cur, cur + n, std::memory_order_relaxed));
    peak_.store(std::max(peak_.load(std::memory_order_relaxed), cur + n),
                std::memory_order_relaxed);
    return true;
  }
  void Release(uint64_t n) { used_.fetch_sub(n, std::memory_order_relaxed); }

  uint64_t used() const { return used_.load(std::memory_order_relaxed); }
  // The most ever charged at once (a racy maximum: a statistic, not a bound).
  uint64_t peak() const { return peak_.load(std::memory_order_relaxed); }
  uint64_t limit() const { return limit_; }

 private:
  const uint64_t limit_;
  std::atomic<uint64_t> used_{0};
  std::atomic<uint64_t> peak_{0};
};

// What one connection holds of a budget, with its own limit on top; returned when it goes.
class InboundCharge {
 public:
  InboundCharge() = default;
  InboundCharge(InboundBudget* process, uint64_t limit) : process_(process), limit_(limit) {}
  InboundCharge(const InboundCharge&) = delete;
  InboundCharge& operator=(const InboundCharge&) = delete;
  ~InboundCharge() { ReleaseAll(); }

  // Takes n more bytes; false when the connection's or the process's limit would be exceeded.
  bool TryCharge(uint64_t n) {
    if (n > limit_ || held_ > limit_ - n) return false;
    if (process_ && !process_->TryCharge(n)) return false;
    held_ += n;
    return true;
  }
  void Release(uint64_t n) {
    if (n > held_) n = held_;
    held_ -= n;
    if (process_) process_->Release(n);
  }
  void ReleaseAll() { Release(held_); }
  uint64_t held() const { return held_; }
  uint64_t limit() const { return limit_; }

 private:
  InboundBudget* process_ = nullptr;
  uint64_t limit_ = UINT64_MAX;
  uint64_t held_ = 0;
};

}  // namespace shardps::transport
