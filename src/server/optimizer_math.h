// The element arithmetic of the optimizers, shared by the CPU update rule (optimizer.cc) and the
// CUDA kernels (src/gpu/fused_update.h): every function is __host__ __device__ under nvcc, so the
// CPU tests cover what the GPU runs. Self-contained (no std headers beyond <cmath>), so that
// nvcc compiles it quickly.
//
// g is the element's gradient as the update sees it: scale * (w * pushed + extra) + wd * p.
//   sgd:      p -= lr * g
//   momentum: m = mu * m + g;  p -= lr * (nesterov ? g + mu * m : m)
//   adam:     m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  p -= lr * (m c1) / (sqrt(v c2) + eps)
//             (c1, c2: the bias corrections 1 / (1 - b^t), fixed per step on the host)
//   adagrad:  m += g^2;  p -= lr * g / (sqrt(m) + eps)
#pragma once

#include <cmath>

#if defined(__CUDACC__)
#define SHARDPS_OPT_HD __host__ __device__
#else
#define SHARDPS_OPT_HD
#endif

namespace shardps::server {

// The optimizers as template arguments of the kernels: the values of OptimizerKind (checked in
// optimizer.cc), so a kind is passed as static_cast<int>(kind).
enum OptimizerCode : int { kOptSgd = 0, kOptMomentum = 1, kOptAdam = 2, kOptAdagrad = 3 };

// One step's constants, the same for every element.
struct StepParams {
  float scale, lr, wd, mu, b1, b2, eps, c1, c2;
  bool nesterov;
};

SHARDPS_OPT_HD inline float StepGradient(const StepParams& k, float g, float p) {
  return k.scale * g + k.wd * p;
}

// The new value of parameter `p` for gradient sum `g` (before scale and weight decay); `m` and
// `v` are the element's optimizer state (unused by sgd), updated in place.
template <int kOpt>
SHARDPS_OPT_HD inline float StepElement(const StepParams& k, float p, float g, float* m, float* v) {
  const float gi = StepGradient(k, g, p);
  if constexpr (kOpt == kOptSgd) {
    return p - k.lr * gi;
  } else if constexpr (kOpt == kOptMomentum) {
    const float mi = k.mu * *m + gi;
    *m = mi;
    return k.nesterov ? p - k.lr * (gi + k.mu * mi) : p - k.lr * mi;
  } else if constexpr (kOpt == kOptAdam) {
    const float mi = k.b1 * *m + (1.0f - k.b1) * gi;
    const float vi = k.b2 * *v + (1.0f - k.b2) * gi * gi;
    *m = mi;
    *v = vi;
    return p - k.lr * (mi * k.c1) / (sqrtf(vi * k.c2) + k.eps);
  } else {
    const float mi = *m + gi * gi;
    *m = mi;
    return p - k.lr * gi / (sqrtf(mi) + k.eps);
  }
}

}  // namespace shardps::server
