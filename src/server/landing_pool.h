// The bounded pool of landing buffers that pushes are written into (credits). A grant request
// gets a free buffer at once or waits in FIFO order; a worker that holds no grant cannot write,
// so a slow server pushes back on its senders and its memory does not grow with their number.
// A worker may also hold one buffer granted ahead (with a push's acknowledgement) for its next
// push, which then costs no grant round trip; at most a quarter of the pool stands granted so.
// A buffer may also be leased to a forward of its push (Lease), at most half the pool. What is
// neither granted ahead, nor held by a parked push, nor leased circulates among grant requests,
// and both bounds leave at least one buffer so. Thread-safe.
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

  LandingPool();
  ~LandingPool();
  LandingPool(const LandingPool&) = delete;
  LandingPool& operator=(const LandingPool&) = delete;

  Status Init(transport::Context* ctx, uint32_t buffers, uint64_t buffer_bytes);

  // Grants a buffer to `owner` for the push of `seq` of `chunk`, now or when one frees up;
  // returns true if it had to wait.
  bool Request(const transport::Connection* owner, uint64_t chunk, uint64_t seq, GrantFn grant);
  // A buffer granted ahead to `owner` (for any chunk and step), if one is free with no one
  // waiting, `owner` holds none already, is still connected, and fewer than size() / 4 stand
  // granted ahead or are held by parked pushes (so that the rest, less what is leased,
  // circulates among admissible pushes: no step can starve).
  std::optional<uint32_t> GrantAhead(const transport::Connection* owner);
  // Moves a granted buffer into use; false when `owner` does not hold it, or holds it for
  // another chunk or step.
  bool Claim(uint32_t buffer, const transport::Connection* owner, uint64_t chunk, uint64_t seq);
  // Buffers held by pushes the chunk engine parked (EngineActions::parked_buffers_delta).
  void AddParked(int64_t delta);
  // Returns a buffer that was claimed; the oldest waiter gets it (once its lease ended too).
  void Release(uint32_t buffer);
  // A claimed buffer whose bytes are sent on from where they landed (a push forwarded to its
  // chunk's backup: docs/fault-tolerance.md, "A push"): it goes back to the pool once Release
  // was called and the lease returned ended, whichever is last. Null (the sender copies the
  // bytes instead) when half the pool is leased already, or when leases and buffers held by
  // parked pushes would leave no other buffer: what is left circulates, so leases held until a
  // sync step completes cannot starve the pushes that complete it. The lease may end on any
  // thread, after the pool is gone too (then it does nothing).
  std::shared_ptr<const void> Lease(uint32_t buffer);
  // Leases that end from now on return their buffers to no one (the owner is stopping: the
  // waiters' grants would reach it).
  void CloseLeases();
  // Forgets a closed connection: its granted buffers come back, its waiters are dropped.
  void DropOwner(const transport::Connection* owner);

  const float* data(uint32_t buffer) const;
  // Buffers leased now (Lease).
  uint32_t leased() {
    std::lock_guard<std::mutex> lock(mu_);
    return leased_;
  }
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
    bool leased = false;    // a lease holds it (kApplying)
    bool released = false;  // Release came while it was leased
  };
  // What a lease reaches the pool through; the pool unlinks itself when it closes or goes.
  struct LeaseLink {
    std::mutex mu;
    LandingPool* pool = nullptr;  // guarded by mu
  };
  class LeaseToken;
  // The buffer freed: to the oldest waiter (its grant, to call outside mu_) or the free list.
  GrantFn FreeLocked(uint32_t buffer);
  void Unlease(uint32_t buffer);
  struct Waiter {
    const transport::Connection* owner;
    uint64_t chunk;
    uint64_t seq;
    GrantFn grant;
  };
  std::unique_ptr<transport::MemoryRegion> region_;
  uint64_t buffer_bytes_ = 0;
  std::mutex mu_;
  std::vector<Slot> state_;          // guarded by mu_
  std::vector<uint32_t> free_;       // guarded by mu_
  std::deque<Waiter> waiters_;       // guarded by mu_
  int64_t parked_ = 0;               // guarded by mu_
  uint32_t leased_ = 0;              // guarded by mu_
  std::shared_ptr<LeaseLink> link_;  // this pool's, shared with its leases
};

}  // namespace shardps::server
