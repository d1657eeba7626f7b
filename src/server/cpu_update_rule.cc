#include <algorithm>
#include <cstring>
#include <vector>

#include <fmt/format.h>

#include "compress/codec.h"
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
  CpuUpdateRule(const OptimizerConfig& cfg, uint64_t numel, Applier* parallel, size_t range,
                std::string name)
      : cfg_(cfg), numel_(numel), parallel_(parallel), range_(range), name_(std::move(name)) {
    InitOptimizerState(cfg_, numel_, &state_);
  }

  transport::MemoryKind memory() const override { return transport::MemoryKind::kHost; }
  uint64_t numel() const override { return numel_; }

  std::unique_ptr<Accumulator> NewAccumulator() override {
    return std::make_unique<HostAccumulator>(numel_);
  }

  Status Check(const GradientView& g) const override { return CheckGradient(name_, numel_, g); }

  void Fold(float* dst, const GradientView& g, bool first) override {
    if (g.weight == 1.0f) {
      For([&](size_t lo, size_t hi) {
        compress::DecodeRange(g.encoding, g.block, g.data, numel_, lo, hi, dst + lo, !first);
      });
      return;
    }
    // Weighted: decoded a cache-sized block at a time, then folded as w * g.
    const float w = g.weight;
    For([&](size_t lo, size_t hi) {
      float block[kDecodeBlock];
      for (size_t b = lo; b < hi; b += kDecodeBlock) {
        const size_t end = std::min(hi, b + kDecodeBlock);
        DecodeWeighted(g, b, end, block);
        float* d = dst + b;
        if (first) {
          for (size_t i = 0; i < end - b; ++i) d[i] = w * block[i];
        } else {
          for (size_t i = 0; i < end - b; ++i) d[i] += w * block[i];
        }
      }
    });
  }

  void Apply(const float* in, float* out, const GradientView& grad, const GradientView* extra,
             float scale, std::optional<float> lr, const Publish* publish, Done done) override {
    OptimizerStep step(cfg_, scale, &state_, lr);
    const auto* e = extra ? static_cast<const float*>(extra->data) : nullptr;
    const bool weighted = grad.weight != 1.0f;
    if (grad.encoding == Codec::kNone && !publish && !weighted) {
      const auto* g = static_cast<const float*>(grad.data);
      For([&](size_t lo, size_t hi) { step.Run(in, out, g, e, lo, hi); });
    } else {
      // Decoded a cache-sized block at a time straight into the update (and published from
      // there): the push is read once and no decoded copy of it exists.
      For([&](size_t lo, size_t hi) {
        float block[kDecodeBlock];
        for (size_t b = lo; b < hi; b += kDecodeBlock) {
          const size_t end = std::min(hi, b + kDecodeBlock);
          if (grad.encoding == Codec::kNone && !weighted) {
            step.Run(in, out, static_cast<const float*>(grad.data), e, b, end);
          } else if (!weighted) {
            compress::DecodeRange(grad.encoding, grad.block, grad.data, numel_, b, end, block,
                                  false);
            step.RunBlock(in, out, block, e, b, end);
          } else {
            DecodeWeighted(grad, b, end, block);
            const float w = grad.weight;
            for (size_t i = 0; i < end - b; ++i) block[i] *= w;
            step.RunBlock(in, out, block, e, b, end);
          }
          if (publish) compress::EncodeParams(publish->codec, out, b, end, publish->data);
        }
      });
    }
    done(Status::OK());
  }

  Status SaveState(RuleState* out) override {
    out->steps = state_.steps;
    out->m = state_.m;
    out->v = state_.v;
    out->params.clear();  // the engine's slots hold them
    return Status::OK();
  }
  Status LoadState(const RuleState& s) override {
    if (s.m.size() != state_.m.size() || s.v.size() != state_.v.size())
      return Status::InvalidArgument(
          fmt::format("{}: optimizer state of {} and {} elements for {} and {}", name_, s.m.size(),
                      s.v.size(), state_.m.size(), state_.v.size()));
    state_.steps = s.steps;
    state_.m = s.m;
    state_.v = s.v;
    return Status::OK();
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

  // block[0, end - lo) = the gradient's elements [lo, end), decoded (unweighted).
  void DecodeWeighted(const GradientView& g, size_t lo, size_t end, float* block) const {
    if (g.encoding == Codec::kNone) {
      std::memcpy(block, static_cast<const float*>(g.data) + lo, (end - lo) * sizeof(float));
    } else {
      compress::DecodeRange(g.encoding, g.block, g.data, numel_, lo, end, block, false);
    }
  }

  OptimizerConfig cfg_;
  uint64_t numel_;
  static constexpr size_t kDecodeBlock = 2048;  // 8 KiB of decoded floats, in L1

  Applier* parallel_;
  size_t range_;
  std::string name_;
  OptimizerState state_;
};

}  // namespace

Status CheckGradient(const std::string& name, uint64_t numel, const GradientView& g) {
  if (g.dtype != Dtype::kFloat32)
    return Status::InvalidArgument(name + ": the update rules take float32 gradients");
  if (g.numel != numel)
    return Status::InvalidArgument(
        fmt::format("{}: gradient of {} elements for {} elements", name, g.numel, numel));
  if (g.data == nullptr) return Status::InvalidArgument(name + ": gradient without data");
  if (g.memory != transport::MemoryKind::kHost)
    return Status::InvalidArgument(name + ": pushes are taken from host memory");
  Status st = compress::Check(g.encoding, g.block, g.data, g.bytes, numel);
  if (!st.ok()) return Status::InvalidArgument(name + ": " + st.message());
  return Status::OK();
}

std::unique_ptr<UpdateRule> MakeCpuUpdateRule(const OptimizerConfig& cfg, uint64_t numel,
                                              Applier* parallel, size_t range_elements,
                                              std::string name) {
  return std::make_unique<CpuUpdateRule>(cfg, numel, parallel, range_elements, std::move(name));
}

}  // namespace shardps::server
