// What the exact-value job tests share: integer-valued gradients (sums of them are exact in
// float32), a job's options, and a tensor that SGD with rate 1 updates by exactly the gradient.
#pragma once

#include <chrono>
#include <cstdint>
#include <string>

#include "shardps/coordinator.h"
#include "shardps/types.h"

namespace shardps::testing {

// Integer-valued gradient of worker w at step s for element i: exact in float32.
inline float Grad(uint32_t w, uint64_t s, uint64_t i) {
  return static_cast<float>(static_cast<int64_t>((w + 1) * 3 + s * 7 + i % 13) % 17 - 8);
}

inline CoordinatorOptions Opts(uint32_t servers, uint32_t workers, Mode mode, Aggregate agg,
                               uint64_t chunk_bytes = 4 << 20) {
  CoordinatorOptions co;
  co.num_servers = servers;
  co.num_workers = workers;
  co.mode = mode;
  co.aggregate = agg;
  co.chunk_bytes = chunk_bytes;
  co.heartbeat_timeout = std::chrono::seconds(10);
  co.replicas = 0;  // one copy of each chunk, unless a test asks for a backup
  return co;
}

inline TensorSpec Sgd1(const std::string& name, int64_t n, float init) {
  TensorSpec t;
  t.name = name;
  t.shape = {n};
  t.init_value = init;
  t.optimizer.kind = OptimizerKind::kSgd;
  t.optimizer.lr = 1.0f;
  return t;
}

}  // namespace shardps::testing
