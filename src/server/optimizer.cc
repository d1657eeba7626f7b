#include "server/optimizer.h"

#include <cmath>

#include "core/simd.h"

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

template <typename Params, typename G>
void Run(OptimizerKind kind, const Params& k, const float* in, float* out, G g, float* __restrict m,
         float* __restrict v, size_t n) {
  switch (kind) {
    case OptimizerKind::kSgd:
      for (size_t i = 0; i < n; ++i) out[i] = in[i] - k.lr * (k.scale * g(i) + k.wd * in[i]);
      break;
    case OptimizerKind::kMomentum:
      if (k.nesterov) {
        for (size_t i = 0; i < n; ++i) {
          float gi = k.scale * g(i) + k.wd * in[i];
          m[i] = k.mu * m[i] + gi;
          out[i] = in[i] - k.lr * (gi + k.mu * m[i]);
        }
      } else {
        for (size_t i = 0; i < n; ++i) {
          float gi = k.scale * g(i) + k.wd * in[i];
          m[i] = k.mu * m[i] + gi;
          out[i] = in[i] - k.lr * m[i];
        }
      }
      break;
    case OptimizerKind::kAdam:
      for (size_t i = 0; i < n; ++i) {
        float gi = k.scale * g(i) + k.wd * in[i];
        m[i] = k.b1 * m[i] + (1.0f - k.b1) * gi;
        v[i] = k.b2 * v[i] + (1.0f - k.b2) * gi * gi;
        out[i] = in[i] - k.lr * (m[i] * k.c1) / (std::sqrt(v[i] * k.c2) + k.eps);
      }
      break;
    case OptimizerKind::kAdagrad:
      for (size_t i = 0; i < n; ++i) {
        float gi = k.scale * g(i) + k.wd * in[i];
        m[i] += gi * gi;
        out[i] = in[i] - k.lr * gi / (std::sqrt(m[i]) + k.eps);
      }
      break;
  }
}

}  // namespace

OptimizerStep::OptimizerStep(const OptimizerConfig& cfg, float scale, OptimizerState* state,
                             std::optional<float> lr)
    : kind_(cfg.kind) {
  state->steps++;
  k_.scale = scale;
  k_.lr = lr.value_or(cfg.lr);
  k_.wd = cfg.weight_decay;
  k_.mu = cfg.momentum;
  k_.b1 = cfg.beta1;
  k_.b2 = cfg.beta2;
  k_.eps = cfg.eps;
  k_.nesterov = cfg.nesterov;
  if (cfg.kind == OptimizerKind::kAdam) {
    double t = static_cast<double>(state->steps);
    k_.c1 = static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(cfg.beta1), t)));
    k_.c2 = static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(cfg.beta2), t)));
  }
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
