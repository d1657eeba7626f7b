#include "server/optimizer.h"

#include <cmath>

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

struct Params {
  float scale, lr, wd, mu, b1, b2, eps, c1, c2;
  bool nesterov;
};

template <typename G>
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

void ApplyOptimizer(const OptimizerConfig& cfg, const float* in, float* out, const float* grad,
                    const float* extra, float scale, size_t n, OptimizerState* state) {
  state->steps++;
  Params k{};
  k.scale = scale;
  k.lr = cfg.lr;
  k.wd = cfg.weight_decay;
  k.mu = cfg.momentum;
  k.b1 = cfg.beta1;
  k.b2 = cfg.beta2;
  k.eps = cfg.eps;
  k.nesterov = cfg.nesterov;
  if (cfg.kind == OptimizerKind::kAdam) {
    double t = static_cast<double>(state->steps);
    k.c1 = static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(cfg.beta1), t)));
    k.c2 = static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(cfg.beta2), t)));
  }
  float* m = state->m.empty() ? nullptr : state->m.data();
  float* v = state->v.empty() ? nullptr : state->v.data();
  if (extra) {
    Run(cfg.kind, k, in, out, Two{grad, extra}, m, v, n);
  } else {
    Run(cfg.kind, k, in, out, One{grad}, m, v, n);
  }
}

void Accumulate(float* __restrict dst, const float* __restrict src, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] += src[i];
}

}  // namespace shardps::server
