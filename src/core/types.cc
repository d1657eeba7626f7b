#include "shardps/types.h"

#include <fmt/format.h>

namespace shardps {

const char* ModeName(Mode m) { return m == Mode::kSync ? "sync" : "async"; }

Result<Mode> ParseMode(const std::string& s) {
  if (s == "sync") return Mode::kSync;
  if (s == "async") return Mode::kAsync;
  return Status::InvalidArgument(fmt::format("unknown mode '{}' (expected sync or async)", s));
}

const char* AggregateName(Aggregate a) { return a == Aggregate::kMean ? "mean" : "sum"; }

Result<Aggregate> ParseAggregate(const std::string& s) {
  if (s == "mean") return Aggregate::kMean;
  if (s == "sum") return Aggregate::kSum;
  return Status::InvalidArgument(fmt::format("unknown aggregate '{}' (expected mean or sum)", s));
}

const char* OptimizerName(OptimizerKind k) {
  switch (k) {
    case OptimizerKind::kSgd:
      return "sgd";
    case OptimizerKind::kMomentum:
      return "momentum";
    case OptimizerKind::kAdam:
      return "adam";
    case OptimizerKind::kAdagrad:
      return "adagrad";
  }
  return "?";
}

Result<OptimizerKind> ParseOptimizer(const std::string& s) {
  for (auto k : {OptimizerKind::kSgd, OptimizerKind::kMomentum, OptimizerKind::kAdam,
                 OptimizerKind::kAdagrad})
    if (s == OptimizerName(k)) return k;
  return Status::InvalidArgument(
      fmt::format("unknown optimizer '{}' (expected sgd, momentum, adam or adagrad)", s));
}

Status OptimizerConfig::Validate() const {
  if (!(lr >= 0.0f)) return Status::InvalidArgument(fmt::format("learning rate {} < 0", lr));
  if (!(weight_decay >= 0.0f))
    return Status::InvalidArgument(fmt::format("weight decay {} < 0", weight_decay));
  if (!(momentum >= 0.0f && momentum < 1.0f))
    return Status::InvalidArgument(fmt::format("momentum {} outside [0, 1)", momentum));
  if (!(beta1 >= 0.0f && beta1 < 1.0f))
    return Status::InvalidArgument(fmt::format("beta1 {} outside [0, 1)", beta1));
  if (!(beta2 >= 0.0f && beta2 < 1.0f))
    return Status::InvalidArgument(fmt::format("beta2 {} outside [0, 1)", beta2));
  if (!(eps > 0.0f)) return Status::InvalidArgument(fmt::format("eps {} <= 0", eps));
  if (!(initial_accumulator >= 0.0f))
    return Status::InvalidArgument("adagrad initial accumulator < 0");
  return Status::OK();
}

uint64_t TensorSpec::numel() const {
  if (shape.empty()) return 0;
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d <= 0) return 0;
    if (n > (1ull << 40) / static_cast<uint64_t>(d)) return 0;
    n *= static_cast<uint64_t>(d);
  }
  return n;
}

}  // namespace shardps
