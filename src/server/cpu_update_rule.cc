#include <cstring>
#include <vector>

#include <fmt/format.h>

#include "server/applier.h"
#include "server/update_rule.h"

namespace shardps::server {
namespace {

class HostAccumulator final : public Accumulator {
 public:
  explicit HostAccumulator(uint64_t n) : v_(n) {}
  float* data() override { return v_.data(); }

 private:
  std::vector<float> v_;
};

class CpuUpdateRule final : public UpdateRule {
 public:
  CpuUpdateRule(const OptimizerConfig& cfg, uint64_t numel, Applier* parallel, size_t range)
      : cfg_(cfg), numel_(numel), parallel_(parallel), range_(range) {
    InitOptimizerState(cfg_, numel_, &state_);
  }

  transport::MemoryKind memory() const override { return transport::MemoryKind::kHost; }
  uint64_t numel() const override { return numel_; }

  std::unique_ptr<Accumulator> NewAccumulator() override {
    return std::make_unique<HostAccumulator>(numel_);
  }

  Status Check(const GradientView& g) const override {
    if (g.dtype != Dtype::kFloat32 || g.encoding != Encoding::kNone)
      return Status::InvalidArgument("the cpu update rule takes plain float32 gradients");
    if (g.numel != numel_ || g.bytes != numel_ * sizeof(float))
      return Status::InvalidArgument(
          fmt::format("gradient of {} elements in {} bytes for a chunk of {} elements", g.numel,
                      g.bytes, numel_));
    if (g.data == nullptr) return Status::InvalidArgument("gradient without data");
    return Status::OK();
  }

  void Fold(float* dst, const GradientView& g, bool first) override {
    const auto* src = static_cast<const float*>(g.data);
    For([&](size_t lo, size_t hi) {
      if (first) {
        std::memcpy(dst + lo, src + lo, (hi - lo) * sizeof(float));
      } else {
        Accumulate(dst + lo, src + lo, hi - lo);
      }
    });
  }

  void Apply(const float* in, float* out, const GradientView& grad, const GradientView* extra,
             float scale, Done done) override {
    OptimizerStep step(cfg_, scale, &state_);
    const auto* g = static_cast<const float*>(grad.data);
    const auto* e = extra ? static_cast<const float*>(extra->data) : nullptr;
    For([&](size_t lo, size_t hi) { step.Run(in, out, g, e, lo, hi); });
    done(Status::OK());
  }

 private:
  template <typename F>
  void For(const F& body) {
    if (parallel_) {
      parallel_->ParallelFor(numel_, range_, body);
    } else {
      body(0, numel_);
    }
  }

  OptimizerConfig cfg_;
  uint64_t numel_;
  Applier* parallel_;
  size_t range_;
  OptimizerState state_;
};

}  // namespace

std::unique_ptr<UpdateRule> MakeCpuUpdateRule(const OptimizerConfig& cfg, uint64_t numel,
                                              Applier* parallel, size_t range_elements) {
  return std::make_unique<CpuUpdateRule>(cfg, numel, parallel, range_elements);
}

}  // namespace shardps::server
