// The tcp context that the backends with remote keys (ucx, verbs) keep beside their own, for
// connection set-up, their messages and key revocation. Its count of refused peers stays
// readable while the backend is being destroyed: destroying the tcp context closes every
// connection, and handlers still running on the backend's thread meanwhile may ask for it (a
// server's stats, say).
#pragma once

#include <cstdint>
#include <memory>
#include <mutex>

#include "transport/context.h"

namespace shardps::transport {

class TcpSide {
 public:
  void Set(std::unique_ptr<Context> c) {
    std::lock_guard<std::mutex> lock(mu_);
    ctx_ = std::move(c);
  }
  // Not while Reset runs (the backend's Listen and Connect are not called then).
  Context* operator->() const { return ctx_.get(); }

  // Destroys the tcp context, closing its connections; what it refused is remembered.
  void Reset() {
    std::unique_ptr<Context> gone;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (ctx_) refused_ = ctx_->refused_peers();
      gone = std::move(ctx_);
    }
    gone.reset();
  }

  uint64_t refused_peers() const {
    std::lock_guard<std::mutex> lock(mu_);
    return ctx_ ? ctx_->refused_peers() : refused_;
  }

 private:
  mutable std::mutex mu_;
  std::unique_ptr<Context> ctx_;  // guarded by mu_ against Reset
  uint64_t refused_ = 0;
};

}  // namespace shardps::transport
