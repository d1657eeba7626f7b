// CPU optimizers applied to a chunk's parameters: loops over the element arithmetic of
// optimizer_math.h, which the CUDA kernels (src/gpu/fused_update.h) share, vectorized by the
// compiler.
#pragma once

#include <cstddef>
#include <cstdint>
#include <optional>
#include <vector>

#include "server/optimizer_math.h"
#include "shardps/types.h"

namespace shardps::server {

struct OptimizerState {
  std::vector<float> m;  // momentum: velocity; adam: first moment; adagrad: sum of squares
  std::vector<float> v;  // adam: second moment
  uint64_t steps = 0;    // updates applied (adam's bias correction)
};

// Sizes the state for `n` parameters.
void InitOptimizerState(const OptimizerConfig& cfg, size_t n, OptimizerState* state);

// One update from `in` to `out` (which may be the same array as `in` or as `grad`): g = scale *
// (grad + extra)
// (+ weight_decay * p), with `extra` optional (nullptr), then the optimizer's rule.
//   sgd:      p -= lr * g
//   momentum: m = mu * m + g;  p -= lr * (nesterov ? g + mu * m : m)
//   adam:     m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;
//             p -= lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)
//   adagrad:  m += g^2;  p -= lr * g / (sqrt(m) + eps)
void ApplyOptimizer(const OptimizerConfig& cfg, const float* in, float* out, const float* grad,
                    const float* extra, float scale, size_t n, OptimizerState* state);

// The constants of update number `step` (1 for the first) of `cfg` at gradient scale `scale`
// and learning rate `lr` (none: cfg.lr).
StepParams MakeStepParams(const OptimizerConfig& cfg, float scale, uint64_t step,
                          std::optional<float> lr);

// The same update prepared once and run over ranges of the elements (the rule is element-wise,
// so disjoint ranges may run on different threads at once): the constructor advances the step
// count and fixes the step's constants (adam's bias correction); Run covers [lo, hi).
class OptimizerStep {
 public:
  // `lr`: this step's learning rate, in place of cfg.lr (a schedule's, Worker::SetLearningRate).
  OptimizerStep(const OptimizerConfig& cfg, float scale, OptimizerState* state,
                std::optional<float> lr = std::nullopt);
  void Run(const float* in, float* out, const float* grad, const float* extra, size_t lo,
           size_t hi) const;
  // The same over [lo, hi) with the gradient of element lo at grad_block[0] (a decoded block);
  // in, out and extra are indexed as in Run.
  void RunBlock(const float* in, float* out, const float* grad_block, const float* extra, size_t lo,
                size_t hi) const;

 private:
  OptimizerKind kind_;
  StepParams k_{};
  float* m_;
  float* v_;
};

// dst[i] += src[i]
void Accumulate(float* dst, const float* src, size_t n);

}  // namespace shardps::server
