// The update-rule seam: what the chunk engine asks of the memory a shard lives in. A rule owns
// the optimizer state of one chunk where the shard lives (host memory here; device memory for
// the CUDA rule), folds pushed gradients into accumulators and applies the optimizer, taking
// each gradient as a typed view (dtype and encoding), so that codecs plug in without the engine
// knowing them. Apply completes through a callback: the CPU rule calls it before it returns, a
// device rule when its stream is done.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "server/optimizer.h"
#include "shardps/status.h"
#include "shardps/types.h"
#include "transport/memory.h"

namespace shardps::gpu {
class Device;
}

namespace shardps::server {

class Applier;

enum class Dtype : uint8_t { kFloat32 = 0 };

// A gradient as it landed: `bytes` bytes at `data` (in the rule's memory kind) encoding
// `numel` elements of `dtype` with `encoding` (a codec of docs/compression.md; `block` for
// int8 and onebit).
struct GradientView {
  const void* data = nullptr;
  uint64_t bytes = 0;
  uint64_t numel = 0;
  Dtype dtype = Dtype::kFloat32;
  Codec encoding = Codec::kNone;
  uint32_t block = 256;
  // The push's weight (per-worker weights, docs/consistency.md): Fold and Apply take
  // weight * g. A weight of 1 costs nothing extra.
  float weight = 1.0f;
  // Where `data` is: pushes land in host memory; a running sum is in the rule's memory.
  transport::MemoryKind memory = transport::MemoryKind::kHost;
};

// Where an update also publishes the new parameters encoded for compressed pulls (fp16, bf16),
// element i at element i of `data`; written range by range as the update computes them.
struct Publish {
  void* data = nullptr;
  Codec codec = Codec::kNone;
};

// What a checkpoint keeps of a rule (docs/fault-tolerance.md): the optimizer's step count and
// state arrays (as InitOptimizerState sizes them), and the fp32 parameters where the rule owns
// them (owns_parameters).
struct RuleState {
  uint64_t steps = 0;
  std::vector<float> m, v;
  std::vector<float> params;
};

// Scratch memory for a step's running sum, in the rule's memory kind.
class Accumulator {
 public:
  virtual ~Accumulator() = default;
  virtual float* data() = 0;
};

class UpdateRule {
 public:
  using Done = std::function<void(Status)>;
  virtual ~UpdateRule() = default;

  virtual transport::MemoryKind memory() const = 0;
  virtual uint64_t numel() const = 0;
  // A rule that keeps the chunk's fp32 parameters itself (the device rule: in GPU memory) is
  // applied with in = out = null and always publishes, into the slot of the new version (codec
  // kNone: fp32); the engine then never sums a step in a slot.
  virtual bool owns_parameters() const { return false; }

  // A new accumulator of numel() floats.
  virtual std::unique_ptr<Accumulator> NewAccumulator() = 0;

  // Checks that `g` is a well-formed gradient of numel() elements (right length for its
  // encoding, scales finite, indices in range and ascending: compress::Check); the error names
  // the rule's chunk. Nothing is changed when it is not.
  virtual Status Check(const GradientView& g) const = 0;

  // dst = w * g (first) or dst += w * g (w: g.weight), element-wise, over numel() floats, decoding
  // `g` as it goes (no decoded copy); `g` passed Check.
  virtual void Fold(float* dst, const GradientView& g, bool first) = 0;

  // out = rule(in, scale * (w * grad + extra)) (w: grad.weight), with extra optional, advancing the
  // optimizer state by one step, at learning rate `lr` (none: the rule's configured one); `grad` is
  // decoded range by range into the update, and `extra` is plain fp32 (a running sum). `out` may
  // alias `in` or grad's data. With `publish`, the new parameters are also written encoded there.
  // `done` is called exactly once: inline (CPU) or later on another thread (a device rule), which
  // the caller must then route to the chunk's owner.
  virtual void Apply(const float* in, float* out, const GradientView& grad,
                     const GradientView* extra, float scale, std::optional<float> lr,
                     const Publish* publish, Done done) = 0;

  // Owner thread, no update in flight: the state a checkpoint keeps, and its restoration (the
  // optimizer's steps and arrays; the parameters were given when the rule was made).
  // InvalidArgument when `s` does not fit the rule: arrays of another size.
  virtual Status SaveState(RuleState* out) {
    (void)out;
    return Status::Internal("this update rule keeps no checkpoint state");
  }
  virtual Status LoadState(const RuleState& s) {
    (void)s;
    return Status::Internal("this update rule takes no checkpoint state");
  }
};

// Check of a CPU or device rule: `g` is a well-formed gradient of `numel` elements in host
// memory; errors start with `name`.
Status CheckGradient(const std::string& name, uint64_t numel, const GradientView& g);

// The CPU rule: today's fused optimizer in cache-sized blocks, split over idle apply threads
// (`parallel`, may be null) for large chunks in ranges of `range_elements`.
// `name` (e.g. "tensor 'w1' chunk 3") prefixes the errors of Check.
std::unique_ptr<UpdateRule> MakeCpuUpdateRule(const OptimizerConfig& cfg, uint64_t numel,
                                              Applier* parallel, size_t range_elements,
                                              std::string name = "chunk");

// The device rule (docs/gpu.md): the chunk's parameters (from `init`, numel floats in host
// memory) and optimizer state live in `device`'s memory; pushes (in host memory, which should be
// pinned) are copied into a staging buffer of `max_push_bytes` on stream `stream` and decoded,
// summed and applied there by the fused kernels; each new version is copied into the slot the
// engine publishes it in. `host_slots` (the chunk's slots, `slot_bytes` bytes) are pinned for the
// rule's lifetime. ResourceExhausted when the device lacks the memory.
Result<std::unique_ptr<UpdateRule>> MakeDeviceUpdateRule(std::shared_ptr<gpu::Device> device,
                                                         int stream, const OptimizerConfig& cfg,
                                                         uint64_t numel, const float* init,
                                                         uint64_t max_push_bytes, void* host_slots,
                                                         size_t slot_bytes, std::string name);

// Device memory a chunk of `numel` elements takes on the device rule with `cfg` and pushes of at
// most `max_push_bytes` (said before it is created).
uint64_t DeviceRuleBytes(const OptimizerConfig& cfg, uint64_t numel, uint64_t max_push_bytes);

}  // namespace shardps::server
