// Key revocation as the backends with remote keys run it (ucx, verbs; docs/transports.md):
// before a region is deregistered its owner tells every live peer (a backend message: u64
// region, u64 token); each peer stops accepting operations against the region and answers
// (u64 token) once those in flight finished; the owner waits for every answer, bounded, so that
// a dead or hung peer does not hold it up for long.
#pragma once

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "core/codec.h"

namespace shardps::transport {

// The connections of `conns` that are still open; those gone or closed are dropped from it.
// The caller holds the lock that guards `conns`.
template <typename Conn>
std::vector<std::shared_ptr<Conn>> LiveConnections(std::vector<std::weak_ptr<Conn>>* conns) {
  std::vector<std::shared_ptr<Conn>> live;
  for (auto it = conns->begin(); it != conns->end();) {
    auto c = it->lock();
    if (!c || c->closed()) {
      it = conns->erase(it);
      continue;
    }
    live.push_back(std::move(c));
    ++it;
  }
  return live;
}

// The revocations a context waits on: by token, the answers still missing.
class Revocations {
 public:
  // Sends the revocation of `region` as message `tag` to each of `peers` (their SendRaw) and
  // waits until all answered or `wait` passed.
  template <typename Conn>
  void Revoke(const std::vector<std::shared_ptr<Conn>>& peers, uint32_t tag, uint64_t region,
              std::chrono::milliseconds wait) {
    if (peers.empty()) return;
    uint64_t token;
    {
      std::lock_guard<std::mutex> lock(mu_);
      token = next_token_++;
      missing_[token] = static_cast<int64_t>(peers.size());
    }
    Bytes meta;
    Writer w(&meta);
    w.Put(region);
    w.Put(token);
    for (auto& c : peers) c->SendRaw(tag, meta);
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, wait, [&] { return missing_[token] <= 0; });
    missing_.erase(token);
  }

  // A peer's answer to revocation `token`; one for a revocation no longer waited on (it timed
  // out) or never sent is ignored.
  void Answered(uint64_t token) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = missing_.find(token);
    if (it != missing_.end() && --it->second <= 0) cv_.notify_all();
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  uint64_t next_token_ = 1;              // guarded by mu_
  std::map<uint64_t, int64_t> missing_;  // guarded by mu_
};

}  // namespace shardps::transport
