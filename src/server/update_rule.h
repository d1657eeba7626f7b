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

#include "server/optimizer.h"
#include "shardps/status.h"
#include "shardps/types.h"
#include "transport/memory.h"

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
};

// Where an update also publishes the new parameters encoded for compressed pulls (fp16, bf16),
// element i at element i of `data`; written range by range as the update computes them.
struct Publish {
  void* data = nullptr;
  Codec codec = Codec::kNone;
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
};

// The CPU rule: today's fused optimizer in cache-sized blocks, split over idle apply threads
// (`parallel`, may be null) for large chunks in ranges of `range_elements`.
// `name` (e.g. "tensor 'w1' chunk 3") prefixes the errors of Check.
std::unique_ptr<UpdateRule> MakeCpuUpdateRule(const OptimizerConfig& cfg, uint64_t numel,
                                              Applier* parallel, size_t range_elements,
                                              std::string name = "chunk");

}  // namespace shardps::server
