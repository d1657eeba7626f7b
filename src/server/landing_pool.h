// The bounded pool of landing buffers that pushes are written into (credits). A grant request
// gets a free buffer at once or waits in FIFO order; a worker that holds no grant cannot write,
// so a slow server pushes back on its senders and its memory does not grow with their number.
// A worker may also hold one buffer granted ahead (with a push's acknowledgement) for its next
// push, which then costs no grant round trip; at most a quarter of the pool stands granted so,
// so the rest always circulates among grant requests. Thread-safe.
#pragma once

#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <vector>

#include "shardps/status.h"
#include "transport/connection.h"
#include "transport/context.h"

namespace shardps::server {

class LandingPool {
 public:
  // Called (possibly on another thread, never inline in Request) when a buffer is granted.
  using GrantFn = std::function<void(uint32_t buffer)>;

  Status Init(transport::Context* ctx, uint32_t buffers, uint64_t buffer_bytes);

  // Grants a buffer to `owner` for the push of `seq` of `chunk`, now or when one frees up;
  // returns true if it had to wait.
  bool Request(const transport::Connection* owner, uint64_t chunk, uint64_t seq, GrantFn grant);
  // A buffer granted ahead to `owner` (for any chunk and step), if one is free with no one
  // waiting, `owner` holds none already, is still connected, and fewer than size() / 4 stand
  // granted ahead or are held by parked pushes (so that three quarters of the pool always
  // circulate among admissible pushes: no step can starve).
  std::optional<uint32_t> GrantAhead(const transport::Connection* owner);
  // Moves a granted buffer into use; false when `owner` does not hold it, or holds it for
  // another chunk or step.
  bool Claim(uint32_t buffer, const transport::Connection* owner, uint64_t chunk, uint64_t seq);
  // Buffers held by pushes the chunk engine parked (EngineActions::parked_buffers_delta).
  void AddParked(int64_t delta);
  // Returns a buffer that was claimed; the oldest waiter gets it.
  void Release(uint32_t buffer);
  // Forgets a closed connection: its granted buffers come back, its waiters are dropped.
  void DropOwner(const transport::Connection* owner);

  const float* data(uint32_t buffer) const;
  uint64_t buffer_bytes() const { return buffer_bytes_; }
  uint32_t size() const { return static_cast<uint32_t>(state_.size()); }
  // Buffers granted or being applied (not free).
  uint32_t in_use() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<uint32_t>(state_.size() - free_.size());
  }
  const transport::RemoteKey& key() const { return region_->remote_key(); }
  // The buffers' memory, all of them.
  void* base() const { return region_->data(); }
  size_t total_bytes() const { return region_->size(); }

 private:
  enum class State : uint8_t { kFree, kGranted, kApplying };
  struct Slot {
    State state = State::kFree;
    const transport::Connection* owner = nullptr;
    bool ahead = false;  // granted ahead and not claimed yet (for any chunk and step)
    uint64_t chunk = 0;  // what it was granted for, unless ahead
    uint64_t seq = 0;
  };
  struct Waiter {
    const transport::Connection* owner;
    uint64_t chunk;
    uint64_t seq;
    GrantFn grant;
  };
  std::unique_ptr<transport::MemoryRegion> region_;
  uint64_t buffer_bytes_ = 0;
  std::mutex mu_;
  std::vector<Slot> state_;     // guarded by mu_
  std::vector<uint32_t> free_;  // guarded by mu_
  std::deque<Waiter> waiters_;  // guarded by mu_
  int64_t parked_ = 0;          // guarded by mu_
};

}  // namespace shardps::server
