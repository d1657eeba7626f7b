#include "server/optimizer.h"

#include <cmath>

#include "core/simd.h"
#include "server/optimizer_math.h"

namespace shardps::server {

void InitOptimizerState(const OptimizerConfig& cfg, size_t n, OptimizerState* state) {
  state->steps = 0;
  state->m.clear();
  state->v.clear();
  switch (cfg.kind) {
    case OptimizerKind::kSgd:
      break;
    case OptimizerKind::kMomentum:
      state->m.assign(n, 0.0f);
      break;
    case OptimizerKind::kAdam:
      state->m.assign(n, 0.0f);
      state->v.assign(n, 0.0f);
      break;
    case OptimizerKind::kAdagrad:
      state->m.assign(n, cfg.initial_accumulator);
      break;
  }
}

static_assert(kOptSgd == static_cast<int>(OptimizerKind::kSgd) &&
                  kOptMomentum == static_cast<int>(OptimizerKind::kMomentum) &&
                  kOptAdam == static_cast<int>(OptimizerKind::kAdam) &&
                  kOptAdagrad == static_cast<int>(OptimizerKind::kAdagrad),
              "OptimizerCode takes the values of OptimizerKind");

namespace {

// The rules, written once over a gradient source G (one array, or the sum of two); the loops
// vectorize. `out` may alias `in` and the gradient (the server accumulates a step's sum in the
// slot it then writes), so nothing here is restrict; each element is read before it is written.
struct One {
  const float* a;
  float operator()(size_t i) const { return a[i]; }
};
struct Two {
  const float* a;
  const float* b;
  float operator()(size_t i) const { return a[i] + b[i]; }
};

template <int kOpt, typename G>
void RunOpt(const StepParams& k, const float* in, float* out, G g, float* __restrict m,
            float* __restrict v, size_t n) {
  // The state goes through locals (loaded, updated, stored), which the loops vectorize as they
  // did with the arithmetic written out here.
  for (size_t i = 0; i < n; ++i) {
    float mi = 0.0f, vi = 0.0f;
    if constexpr (kOpt != kOptSgd) mi = m[i];
    if constexpr (kOpt == kOptAdam) vi = v[i];
    out[i] = StepElement<kOpt>(k, in[i], g(i), &mi, &vi);
    if constexpr (kOpt != kOptSgd) m[i] = mi;
    if constexpr (kOpt == kOptAdam) v[i] = vi;
  }
}

// The rules are those of optimizer_math.h (shared with the CUDA kernels).
template <typename G>
void Run(OptimizerKind kind, const StepParams& k, const float* in, float* out, G g, float* m,
         float* v, size_t n) {
  switch (kind) {
    case OptimizerKind::kSgd:
      return RunOpt<kOptSgd>(k, in, out, g, m, v, n);
    case OptimizerKind::kMomentum:
      return RunOpt<kOptMomentum>(k, in, out, g, m, v, n);
    case OptimizerKind::kAdam:
      return RunOpt<kOptAdam>(k, in, out, g, m, v, n);
    case OptimizerKind::kAdagrad:
      return RunOpt<kOptAdagrad>(k, in, out, g, m, v, n);
  }
}

}  // namespace

StepParams MakeStepParams(const OptimizerConfig& cfg, float scale, uint64_t step,
                          std::optional<float> lr) {
  StepParams k{};
  k.scale = scale;
  k.lr = lr.value_or(cfg.lr);
  k.wd = cfg.weight_decay;
  k.mu = cfg.momentum;
  k.b1 = cfg.beta1;
  k.b2 = cfg.beta2;
  k.eps = cfg.eps;
  k.nesterov = cfg.nesterov;
  if (cfg.kind == OptimizerKind::kAdam) {
    double t = static_cast<double>(step);
    k.c1 = static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(cfg.beta1), t)));
    k.c2 = static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(cfg.beta2), t)));
  }
  return k;
}

OptimizerStep::OptimizerStep(const OptimizerConfig& cfg, float scale, OptimizerState* state,
                             std::optional<float> lr)
    : kind_(cfg.kind) {
  state->steps++;
  k_ = MakeStepParams(cfg, scale, state->steps, lr);
  m_ = state->m.empty() ? nullptr : state->m.data();
  v_ = state->v.empty() ? nullptr : state->v.data();
}

SHARDPS_VECTOR_CLONES
void OptimizerStep::Run(const float* in, float* out, const float* grad, const float* extra,
                        size_t lo, size_t hi) const {
  if (hi <= lo) return;
  float* m = m_ ? m_ + lo : nullptr;
  float* v = v_ ? v_ + lo : nullptr;
  if (extra) {
    server::Run(kind_, k_, in + lo, out + lo, Two{grad + lo, extra + lo}, m, v, hi - lo);
  } else {
    server::Run(kind_, k_, in + lo, out + lo, One{grad + lo}, m, v, hi - lo);
  }
}

SHARDPS_VECTOR_CLONES
void OptimizerStep::RunBlock(const float* in, float* out, const float* grad_block,
                             const float* extra, size_t lo, size_t hi) const {
  if (hi <= lo) return;
  float* m = m_ ? m_ + lo : nullptr;
  float* v = v_ ? v_ + lo : nullptr;
  if (extra) {
    server::Run(kind_, k_, in + lo, out + lo, Two{grad_block, extra + lo}, m, v, hi - lo);
  } else {
    server::Run(kind_, k_, in + lo, out + lo, One{grad_block}, m, v, hi - lo);
  }
}

void ApplyOptimizer(const OptimizerConfig& cfg, const float* in, float* out, const float* grad,
                    const float* extra, float scale, size_t n, OptimizerState* state) {
  OptimizerStep(cfg, scale, state).Run(in, out, grad, extra, 0, n);
}

SHARDPS_VECTOR_CLONES
void Accumulate(float* __restrict dst, const float* __restrict src, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] += src[i];
}

}  // namespace shardps::server
