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
  // Bounded staleness (ssp:K): every push is applied on arrival, and a worker's push of step s
  // starts only once every live worker's push of step s - K - 1 was applied (K = staleness).
  kSsp = 2,
};
const char* ModeName(Mode m);
// "sync", "async" or "ssp:K" (K in [0, 1000000], the staleness bound; "ssp" alone is an error).
// `staleness` receives K (0 for the other modes).
Result<Mode> ParseMode(const std::string& s, uint32_t* staleness = nullptr);
// The mode as ParseMode reads it ("ssp:3").
std::string ModeString(Mode m, uint32_t staleness);

// How the servers weigh each worker's push (docs/consistency.md, "Weights").
enum class WeightRule : uint8_t {
  kFixed = 0,      // eta_i = w_i
  kStaleness = 1,  // eta_i = w_i / (1 + s), s: versions published since the one the push read
};
const char* WeightRuleName(WeightRule r);
Result<WeightRule> ParseWeightRule(const std::string& s);
// "1,0.5,2" -> {1, 0.5, 2}; every weight finite and in [0, 1000]. Empty -> {}.
Result<std::vector<float>> ParseWeights(const std::string& s);

// How a sync step's pushes are combined before the optimizer sees them.
enum class Aggregate : uint8_t { kMean = 0, kSum = 1 };
const char* AggregateName(Aggregate a);
Result<Aggregate> ParseAggregate(const std::string& s);

enum class OptimizerKind : uint8_t { kSgd = 0, kMomentum = 1, kAdam = 2, kAdagrad = 3 };
const char* OptimizerName(OptimizerKind k);
Result<OptimizerKind> ParseOptimizer(const std::string& s);

// InvalidArgument unless `lr` is a finite number >= 0: a declared rate (OptimizerConfig) or one
// set for later pushes (Worker::SetLearningRate), checked by the worker and by the server.
Status CheckLearningRate(float lr);

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

// How gradients (and, for fp16/bf16, parameters) of a tensor travel on the wire; the formats
// are in docs/compression.md.
enum class Codec : uint8_t { kNone = 0, kFp16 = 1, kBf16 = 2, kInt8 = 3, kOneBit = 4, kTopK = 5 };
const char* CodecName(Codec c);

// A tensor's gradient compression. Written as `none`, `fp16`, `bf16`, `int8[:block=N]`,
// `onebit[:block=N]` or `topk[:R]` where R is a fraction (`0.01`), a percentage (`1%`), a count
// (`k=1000`, or a bare integer); options are separated by commas, and `ef=on|off` sets error
// feedback (on by default for onebit and topk, off for the others), `warmup=N` a topk warm-up
// over the first N pushes (see below), and `min=N` the smallest
// tensor (in elements) that is compressed (by default 16384 for onebit and topk, 0 for the
// others). Parse sets those defaults; a Compression built in code has min_numel 0.
struct Compression {
  Codec codec = Codec::kNone;
  uint32_t block = 256;         // int8, onebit: elements per fp32 scale
  double ratio = 0.01;          // topk: fraction of the elements sent (when count is 0)
  uint64_t count = 0;           // topk: elements sent per tensor (split over its chunks)
  bool error_feedback = false;  // keep what the codec lost on the worker, add it next time
  // Tensors of fewer elements are pushed uncompressed (`min=N`): biases and small layers cost
  // little on the wire and suffer most from a lossy codec.
  uint64_t min_numel = 0;
  // topk (`warmup=N`): over a tensor's first N pushes the share sent falls geometrically from
  // kWarmupStartRatio of the elements to its own (a deep-gradient-compression warm-up: early
  // gradients change fast, and what a sparse push leaves behind grows stale); 0: none.
  uint64_t warmup = 0;
  static constexpr double kWarmupStartRatio = 0.25;

  // The compression of push number `push` (0 for the first) of a tensor of `tensor_numel`
  // elements: itself, or during a topk warm-up the same with the count of that push.
  Compression AtPush(uint64_t tensor_numel, uint64_t push) const;

  static Result<Compression> Parse(const std::string& s);
  std::string ToString() const;
  Status Validate() const;
  bool operator==(const Compression& o) const = default;
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
  // How pushed gradients are encoded (the server decodes them into the update).
  Compression compression;
  // How parameters are pulled: kNone (fp32), kFp16 or kBf16 (expanded to fp32 on the worker).
  Codec pull_codec = Codec::kNone;

  // Product of the shape; 0 for an invalid shape.
  uint64_t numel() const;
};

}  // namespace shardps
