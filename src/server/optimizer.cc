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

void Sgd(float* __restrict p, const float* __restrict g, float scale, float lr, float wd,
         size_t n) {
  for (size_t i = 0; i < n; ++i) p[i] -= lr * (scale * g[i] + wd * p[i]);
}

void Momentum(float* __restrict p, const float* __restrict g, float* __restrict m, float scale,
              float lr, float wd, float mu, bool nesterov, size_t n) {
  if (nesterov) {
    for (size_t i = 0; i < n; ++i) {
      float gi = scale * g[i] + wd * p[i];
      m[i] = mu * m[i] + gi;
      p[i] -= lr * (gi + mu * m[i]);
    }
  } else {
    for (size_t i = 0; i < n; ++i) {
      float gi = scale * g[i] + wd * p[i];
      m[i] = mu * m[i] + gi;
      p[i] -= lr * m[i];
    }
  }
}

void Adam(float* __restrict p, const float* __restrict g, float* __restrict m, float* __restrict v,
          float scale, float lr, float wd, float b1, float b2, float eps, float c1, float c2,
          size_t n) {
  for (size_t i = 0; i < n; ++i) {
    float gi = scale * g[i] + wd * p[i];
    m[i] = b1 * m[i] + (1.0f - b1) * gi;
    v[i] = b2 * v[i] + (1.0f - b2) * gi * gi;
    float mh = m[i] * c1;
    float vh = v[i] * c2;
    p[i] -= lr * mh / (std::sqrt(vh) + eps);
  }
}

void Adagrad(float* __restrict p, const float* __restrict g, float* __restrict h, float scale,
             float lr, float wd, float eps, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    float gi = scale * g[i] + wd * p[i];
    h[i] += gi * gi;
    p[i] -= lr * gi / (std::sqrt(h[i]) + eps);
  }
}

}  // namespace

void ApplyOptimizer(const OptimizerConfig& cfg, float* params, const float* grad, float scale,
                    size_t n, OptimizerState* state) {
  state->steps++;
  switch (cfg.kind) {
    case OptimizerKind::kSgd:
      Sgd(params, grad, scale, cfg.lr, cfg.weight_decay, n);
      break;
    case OptimizerKind::kMomentum:
      Momentum(params, grad, state->m.data(), scale, cfg.lr, cfg.weight_decay, cfg.momentum,
               cfg.nesterov, n);
      break;
    case OptimizerKind::kAdam: {
      double t = static_cast<double>(state->steps);
      float c1 = static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(cfg.beta1), t)));
      float c2 = static_cast<float>(1.0 / (1.0 - std::pow(static_cast<double>(cfg.beta2), t)));
      Adam(params, grad, state->m.data(), state->v.data(), scale, cfg.lr, cfg.weight_decay,
           cfg.beta1, cfg.beta2, cfg.eps, c1, c2, n);
      break;
    }
    case OptimizerKind::kAdagrad:
      Adagrad(params, grad, state->m.data(), scale, cfg.lr, cfg.weight_decay, cfg.eps, n);
      break;
  }
}

void Accumulate(float* __restrict dst, const float* __restrict src, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] += src[i];
}

}  // namespace shardps::server
