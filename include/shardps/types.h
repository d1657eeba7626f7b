// Value types shared by the public API: consistency modes, optimizers, tensor declarations.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "shardps/status.h"

namespace shardps {

// How the servers fold pushes into versions (docs/architecture.md, "Consistency").
enum class Mode : uint8_t {
  kSync = 0,   // version t is published when every worker's push for step t arrived
  kAsync = 1,  // every push is applied on arrival and publishes a new version
};
const char* ModeName(Mode m);
Result<Mode> ParseMode(const std::string& s);

// How a sync step's pushes are combined before the optimizer sees them.
enum class Aggregate : uint8_t { kMean = 0, kSum = 1 };
const char* AggregateName(Aggregate a);
Result<Aggregate> ParseAggregate(const std::string& s);

enum class OptimizerKind : uint8_t { kSgd = 0, kMomentum = 1, kAdam = 2, kAdagrad = 3 };
const char* OptimizerName(OptimizerKind k);
Result<OptimizerKind> ParseOptimizer(const std::string& s);

struct OptimizerConfig {
  OptimizerKind kind = OptimizerKind::kSgd;
  float lr = 0.01f;
  float weight_decay = 0.0f;         // L2: the gradient becomes g + weight_decay * p
  float momentum = 0.9f;             // momentum
  bool nesterov = false;             // momentum
  float beta1 = 0.9f;                // adam
  float beta2 = 0.999f;              // adam
  float eps = 1e-8f;                 // adam, adagrad
  float initial_accumulator = 0.0f;  // adagrad
  // InvalidArgument naming the bad field (negative lr, beta outside [0,1), ...).
  Status Validate() const;
};

// A dense float32 tensor to be held by the servers.
struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  // Initial value (used from worker 0): `init` (numel floats, copied during Declare) when set,
  // else `init_value`.
  const float* init = nullptr;
  float init_value = 0.0f;
  OptimizerConfig optimizer;

  // Product of the shape; 0 for an invalid shape.
  uint64_t numel() const;
};

}  // namespace shardps
