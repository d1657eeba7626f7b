#include "server/landing_pool.h"

#include <algorithm>

#include <fmt/format.h>

namespace shardps::server {

LandingPool::LandingPool() : link_(std::make_shared<LeaseLink>()) { link_->pool = this; }

LandingPool::~LandingPool() { CloseLeases(); }

Status LandingPool::Init(transport::Context* ctx, uint32_t buffers, uint64_t buffer_bytes) {
  auto region = ctx->AllocateRegion(static_cast<size_t>(buffers) * buffer_bytes);
  if (!region.ok())
    return region.status().WithContext(
        fmt::format("allocating {} landing buffers of {} bytes", buffers, buffer_bytes));
  region_ = std::move(region).value();
  buffer_bytes_ = buffer_bytes;
  state_.assign(buffers, Slot{});
  for (uint32_t i = buffers; i > 0; --i) free_.push_back(i - 1);
  return Status::OK();
}

bool LandingPool::Request(const transport::Connection* owner, uint64_t chunk, uint64_t seq,
                          GrantFn grant) {
  uint32_t b;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (free_.empty()) {
      waiters_.push_back(Waiter{owner, chunk, seq, std::move(grant)});
      return true;
    }
    b = free_.back();
    free_.pop_back();
    state_[b] = Slot{State::kGranted, owner, false, chunk, seq};
  }
  grant(b);
  return false;
}

std::optional<uint32_t> LandingPool::GrantAhead(const transport::Connection* owner) {
  std::lock_guard<std::mutex> lock(mu_);
  // closed() is checked under the lock: a connection is marked closed before DropOwner runs,
  // so a buffer granted here to a closing connection is still taken back by DropOwner.
  if (free_.empty() || !waiters_.empty() || owner->closed()) return std::nullopt;
  size_t ahead = 0;
  for (const Slot& s : state_) {
    if (s.ahead && s.owner == owner) return std::nullopt;
    ahead += s.ahead;
  }
  if (static_cast<int64_t>(ahead) + parked_ + 1 > static_cast<int64_t>(state_.size() / 4))
    return std::nullopt;
  uint32_t b = free_.back();
  free_.pop_back();
  state_[b] = Slot{State::kGranted, owner, true};
  return b;
}

void LandingPool::AddParked(int64_t delta) {
  if (delta == 0) return;
  std::lock_guard<std::mutex> lock(mu_);
  parked_ += delta;
}

bool LandingPool::Claim(uint32_t buffer, const transport::Connection* owner, uint64_t chunk,
                        uint64_t seq) {
  std::lock_guard<std::mutex> lock(mu_);
  if (buffer >= state_.size()) return false;
  Slot& s = state_[buffer];
  if (s.state != State::kGranted || s.owner != owner) return false;
  if (!s.ahead && (s.chunk != chunk || s.seq != seq)) return false;
  s.state = State::kApplying;
  s.ahead = false;
  return true;
}

void LandingPool::Release(uint32_t buffer) {
  GrantFn grant;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (buffer >= state_.size()) return;
    if (state_[buffer].leased) {
      state_[buffer].released = true;  // freed when the lease ends (Unlease)
      return;
    }
    grant = FreeLocked(buffer);
  }
  if (grant) grant(buffer);
}

LandingPool::GrantFn LandingPool::FreeLocked(uint32_t buffer) {
  if (waiters_.empty()) {
    state_[buffer] = Slot{};
    free_.push_back(buffer);
    return nullptr;
  }
  Waiter w = std::move(waiters_.front());
  waiters_.pop_front();
  state_[buffer] = Slot{State::kGranted, w.owner, false, w.chunk, w.seq};
  return std::move(w.grant);
}

// Ends a lease (LandingPool::Lease) wherever its last holder lets go of it.
class LandingPool::LeaseToken {
 public:
  LeaseToken(std::shared_ptr<LeaseLink> link, uint32_t buffer)
      : link_(std::move(link)), buffer_(buffer) {}
  ~LeaseToken() {
    std::lock_guard<std::mutex> lock(link_->mu);
    if (link_->pool) link_->pool->Unlease(buffer_);
  }
  LeaseToken(const LeaseToken&) = delete;
  LeaseToken& operator=(const LeaseToken&) = delete;

 private:
  std::shared_ptr<LeaseLink> link_;
  uint32_t buffer_;
};

std::shared_ptr<const void> LandingPool::Lease(uint32_t buffer) {
  std::lock_guard<std::mutex> lock(mu_);
  if (buffer >= state_.size()) return nullptr;
  Slot& s = state_[buffer];
  const auto size = static_cast<int64_t>(state_.size());
  if (s.state != State::kApplying || s.leased || s.released || leased_ >= size / 2 ||
      leased_ + 1 + std::max<int64_t>(parked_, 0) >= size)
    return nullptr;
  s.leased = true;
  leased_++;
  return std::make_shared<LeaseToken>(link_, buffer);
}

void LandingPool::Unlease(uint32_t buffer) {
  GrantFn grant;
  {
    std::lock_guard<std::mutex> lock(mu_);
    Slot& s = state_[buffer];
    s.leased = false;
    leased_--;
    if (!s.released) return;
    grant = FreeLocked(buffer);
  }
  if (grant) grant(buffer);
}

void LandingPool::CloseLeases() {
  std::lock_guard<std::mutex> lock(link_->mu);
  link_->pool = nullptr;
}

void LandingPool::DropOwner(const transport::Connection* owner) {
  std::vector<uint32_t> back;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (auto it = waiters_.begin(); it != waiters_.end();)
      it = it->owner == owner ? waiters_.erase(it) : it + 1;
    for (uint32_t i = 0; i < state_.size(); ++i)
      if (state_[i].state == State::kGranted && state_[i].owner == owner) {
        state_[i].state = State::kApplying;  // released just below, through the waiters
        state_[i].ahead = false;
        back.push_back(i);
      }
  }
  for (uint32_t b : back) Release(b);
}

const float* LandingPool::data(uint32_t buffer) const {
  return reinterpret_cast<const float*>(static_cast<const uint8_t*>(region_->data()) +
                                        static_cast<uint64_t>(buffer) * buffer_bytes_);
}

}  // namespace shardps::server
