// The device update rule (docs/gpu.md, "The device rule"): a chunk whose parameters and optimizer
// state live in a device's memory, updated by the fused kernels of src/gpu/.
#include <chrono>
#include <memory>
#include <vector>

#include <fmt/format.h>

#include "compress/codec.h"
#include "gpu/device.h"
#include "server/update_rule.h"

namespace shardps::server {
namespace {

// How long a fold waits for its copy (the landing buffer is handed back after it): a device that
// does not finish in this time is failing.
constexpr std::chrono::milliseconds kCopyTimeout{30000};

int StateArrays(OptimizerKind k) {
  return k == OptimizerKind::kAdam ? 2 : (k == OptimizerKind::kSgd ? 0 : 1);
}

// Device memory, freed once the stream that uses it is idle.
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(std::shared_ptr<gpu::Device> d, int stream, void* p)
      : device_(std::move(d)), stream_(stream), p_(p) {}
  DeviceBuffer(DeviceBuffer&& o) noexcept { *this = std::move(o); }
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    Reset();
    device_ = std::move(o.device_);
    stream_ = o.stream_;
    p_ = o.p_;
    o.p_ = nullptr;
    return *this;
  }
  ~DeviceBuffer() { Reset(); }
  void* get() const { return p_; }
  float* floats() const { return static_cast<float*>(p_); }

 private:
  void Reset() {
    if (!p_) return;
    // What is queued may still use it: a device that does not finish keeps the memory (freed,
    // it could be written after its next owner took it).
    if (device_->Wait(stream_, kCopyTimeout).ok()) device_->Free(p_);
    p_ = nullptr;
  }
  std::shared_ptr<gpu::Device> device_;
  int stream_ = 0;
  void* p_ = nullptr;
};

class DeviceAccumulator final : public Accumulator {
 public:
  explicit DeviceAccumulator(DeviceBuffer b) : b_(std::move(b)) {}
  float* data() override { return b_.floats(); }

 private:
  DeviceBuffer b_;
};

class DeviceUpdateRule final : public UpdateRule {
 public:
  DeviceUpdateRule(std::shared_ptr<gpu::Device> device, int stream, const OptimizerConfig& cfg,
                   uint64_t numel, std::string name)
      : device_(std::move(device)),
        stream_(stream),
        cfg_(cfg),
        numel_(numel),
        name_(std::move(name)) {}

  ~DeviceUpdateRule() override {
    (void)device_->Wait(stream_, kCopyTimeout);
    if (pinned_) device_->Unpin(pinned_);
  }

  Status Init(const float* init, uint64_t max_push_bytes, void* host_slots, size_t slot_bytes) {
    const size_t n = numel_ * sizeof(float);
    // The optimizer's state as the CPU rule starts it (adagrad's initial accumulator).
    OptimizerState state;
    InitOptimizerState(cfg_, numel_, &state);
    SHARDPS_ASSIGN_OR_RETURN(params_, Buffer(n));
    if (!state.m.empty()) {
      SHARDPS_ASSIGN_OR_RETURN(m_, Buffer(n));
    }
    if (!state.v.empty()) {
      SHARDPS_ASSIGN_OR_RETURN(v_, Buffer(n));
    }
    staging_bytes_ = max_push_bytes < 4 ? 4 : max_push_bytes;
    SHARDPS_ASSIGN_OR_RETURN(staging_, Buffer(staging_bytes_));
    SHARDPS_ASSIGN_OR_RETURN(publish_, Buffer(n));
    // A sync step's running sum: allocated now, so that what DeviceRuleBytes counted before the
    // chunk was made is taken before the next chunk counts what is free.
    SHARDPS_ASSIGN_OR_RETURN(reserved_, Buffer(n));
    SHARDPS_RETURN_IF_ERROR(device_->Copy(params_.get(), init, n, stream_));
    if (m_.get()) SHARDPS_RETURN_IF_ERROR(device_->Copy(m_.get(), state.m.data(), n, stream_));
    if (v_.get()) SHARDPS_RETURN_IF_ERROR(device_->Copy(v_.get(), state.v.data(), n, stream_));
    SHARDPS_RETURN_IF_ERROR(device_->Wait(stream_, kCopyTimeout).WithContext(name_));
    if (host_slots && slot_bytes) {
      // Copies into the slots are asynchronous only from pinned memory; without, they are still
      // correct (the runtime stages them), only slower.
      if (device_->Pin(host_slots, slot_bytes).ok()) pinned_ = host_slots;
    }
    return Status::OK();
  }

  // Device memory (the twin's is host memory standing in for it).
  transport::MemoryKind memory() const override { return transport::MemoryKind::kCuda; }
  uint64_t numel() const override { return numel_; }
  bool owns_parameters() const override { return true; }

  std::unique_ptr<Accumulator> NewAccumulator() override {
    if (reserved_.get()) return std::make_unique<DeviceAccumulator>(std::move(reserved_));
    auto b = Buffer(numel_ * sizeof(float));
    if (!b.ok()) {
      // Out of device memory in the middle of a job: the next update reports it.
      if (failed_.ok()) failed_ = b.status();
      return std::make_unique<DeviceAccumulator>(DeviceBuffer());
    }
    return std::make_unique<DeviceAccumulator>(std::move(b).value());
  }

  Status Check(const GradientView& g) const override {
    SHARDPS_RETURN_IF_ERROR(CheckGradient(name_, numel_, g));
    if (g.bytes > staging_bytes_)
      return Status::InvalidArgument(fmt::format("{}: push of {} bytes, at most {} on the device",
                                                 name_, g.bytes, staging_bytes_));
    return Status::OK();
  }

  void Fold(float* dst, const GradientView& g, bool first) override {
    if (!failed_.ok() || dst == nullptr) return;
    gpu::FoldArgs a;
    a.dst = dst;
    a.grad = Encoded(g);
    a.numel = numel_;
    a.first = first;
    Status st = Stage(g, &a.grad);
    // The landing buffer is handed back when Fold returns: its bytes must be on the device (the
    // wait covers the copy, not the kernel queued after it).
    if (st.ok() && g.memory == transport::MemoryKind::kHost)
      st = device_->Wait(stream_, kCopyTimeout);
    if (st.ok()) st = device_->Fold(static_cast<int>(g.encoding), a, stream_);
    if (!st.ok()) failed_ = st.WithContext(name_);
  }

  void Apply(const float*, float*, const GradientView& grad, const GradientView* extra, float scale,
             std::optional<float> lr, const Publish* publish, Done done) override {
    if (!failed_.ok()) return done(failed_);
    if (!publish) return done(Status::Internal(name_ + ": the device rule publishes every update"));
    steps_++;
    gpu::UpdateArgs a;
    a.params = params_.floats();
    a.m = m_.floats();
    a.v = v_.floats();
    a.grad = Encoded(grad);
    a.extra = extra ? static_cast<const float*>(extra->data) : nullptr;
    a.publish = publish_.get();
    a.publish_codec = static_cast<int>(publish->codec);
    a.numel = numel_;
    a.k = MakeStepParams(cfg_, scale, steps_, lr);
    Status st = Stage(grad, &a.grad);
    if (st.ok())
      st =
          device_->Update(static_cast<int>(cfg_.kind), static_cast<int>(grad.encoding), a, stream_);
    if (st.ok())
      st = device_->Copy(publish->data, publish_.get(),
                         compress::ParamBytes(publish->codec, numel_), stream_);
    if (!st.ok()) {
      failed_ = st.WithContext(name_);
      return done(failed_);
    }
    device_->Then(stream_, [done = std::move(done), name = name_](Status s) {
      done(s.ok() ? s : s.WithContext(name));
    });
  }

  Status SaveState(RuleState* out) override {
    const size_t n = numel_ * sizeof(float);
    out->steps = steps_;
    out->params.resize(numel_);
    out->m.assign(m_.get() ? numel_ : 0, 0.0f);
    out->v.assign(v_.get() ? numel_ : 0, 0.0f);
    SHARDPS_RETURN_IF_ERROR(device_->Copy(out->params.data(), params_.get(), n, stream_));
    if (m_.get()) SHARDPS_RETURN_IF_ERROR(device_->Copy(out->m.data(), m_.get(), n, stream_));
    if (v_.get()) SHARDPS_RETURN_IF_ERROR(device_->Copy(out->v.data(), v_.get(), n, stream_));
    return device_->Wait(stream_, kCopyTimeout).WithContext(name_);
  }
  Status LoadState(const RuleState& s) override {
    const size_t n = numel_ * sizeof(float);
    if (s.m.size() != (m_.get() ? numel_ : 0) || s.v.size() != (v_.get() ? numel_ : 0))
      return Status::InvalidArgument(
          fmt::format("{}: checkpoint state of other sizes than the chunk's", name_));
    steps_ = s.steps;
    if (m_.get()) SHARDPS_RETURN_IF_ERROR(device_->Copy(m_.get(), s.m.data(), n, stream_));
    if (v_.get()) SHARDPS_RETURN_IF_ERROR(device_->Copy(v_.get(), s.v.data(), n, stream_));
    return device_->Wait(stream_, kCopyTimeout).WithContext(name_);
  }

 private:
  Result<DeviceBuffer> Buffer(size_t bytes) {
    auto p = device_->Alloc(bytes);
    if (!p.ok())
      return Status::ResourceExhausted(fmt::format("{}: {} has no room for {} bytes: {}", name_,
                                                   device_->name(), bytes, p.status().message()));
    return DeviceBuffer(device_, stream_, *p);
  }

  gpu::EncodedGrad Encoded(const GradientView& g) const {
    gpu::EncodedGrad e;
    e.data = static_cast<const uint8_t*>(g.data);
    e.numel = numel_;
    e.block = g.block;
    e.weight = g.weight;
    return e;
  }

  // A push in host memory is copied into the staging buffer first (queued on the stream, so after
  // the previous kernel that read the staging buffer).
  Status Stage(const GradientView& g, gpu::EncodedGrad* e) {
    if (g.memory != transport::MemoryKind::kHost) return Status::OK();
    SHARDPS_RETURN_IF_ERROR(device_->Copy(staging_.get(), g.data, g.bytes, stream_));
    e->data = static_cast<const uint8_t*>(staging_.get());
    return Status::OK();
  }

  std::shared_ptr<gpu::Device> device_;
  const int stream_;
  const OptimizerConfig cfg_;
  const uint64_t numel_;
  const std::string name_;
  DeviceBuffer params_, m_, v_, staging_, publish_;
  DeviceBuffer reserved_;  // the first accumulator, until NewAccumulator hands it out
  uint64_t staging_bytes_ = 0;
  void* pinned_ = nullptr;
  uint64_t steps_ = 0;
  Status failed_;  // a fold that failed: the next update reports it
};

}  // namespace

uint64_t DeviceRuleBytes(const OptimizerConfig& cfg, uint64_t numel, uint64_t max_push_bytes) {
  // parameters, state, the published copy, staging, and one accumulator of a sync step
  return numel * sizeof(float) * (3 + static_cast<uint64_t>(StateArrays(cfg.kind))) +
         max_push_bytes;
}

Result<std::unique_ptr<UpdateRule>> MakeDeviceUpdateRule(std::shared_ptr<gpu::Device> device,
                                                         int stream, const OptimizerConfig& cfg,
                                                         uint64_t numel, const float* init,
                                                         uint64_t max_push_bytes, void* host_slots,
                                                         size_t slot_bytes, std::string name) {
  auto rule =
      std::make_unique<DeviceUpdateRule>(std::move(device), stream, cfg, numel, std::move(name));
  SHARDPS_RETURN_IF_ERROR(rule->Init(init, max_push_bytes, host_slots, slot_bytes));
  return std::unique_ptr<UpdateRule>(std::move(rule));
}

}  // namespace shardps::server
