#include "shardps/types.h"

#include <algorithm>
#include <charconv>
#include <cmath>
#include <cstdlib>
#include <string_view>

#include <fmt/format.h>

namespace shardps {

const char* ModeName(Mode m) {
  switch (m) {
    case Mode::kSync:
      return "sync";
    case Mode::kAsync:
      return "async";
    case Mode::kSsp:
      return "ssp";
  }
  return "?";
}

Result<Mode> ParseMode(const std::string& s, uint32_t* staleness) {
  if (staleness) *staleness = 0;
  if (s == "sync") return Mode::kSync;
  if (s == "async") return Mode::kAsync;
  if (s.rfind("ssp:", 0) == 0) {
    const char* b = s.data() + 4;
    const char* e = s.data() + s.size();
    uint32_t k = 0;
    auto [p, ec] = std::from_chars(b, e, k);
    if (ec != std::errc() || p != e || b == e || k > 1000000)
      return Status::InvalidArgument(fmt::format(
          "mode '{}': the staleness bound K of ssp:K must be an integer in [0, 1000000]", s));
    if (staleness) *staleness = k;
    return Mode::kSsp;
  }
  return Status::InvalidArgument(
      fmt::format("unknown mode '{}' (expected sync, async or ssp:K, e.g. ssp:2)", s));
}

std::string ModeString(Mode m, uint32_t staleness) {
  if (m == Mode::kSsp) return fmt::format("ssp:{}", staleness);
  return ModeName(m);
}

const char* WeightRuleName(WeightRule r) { return r == WeightRule::kFixed ? "fixed" : "staleness"; }

Result<WeightRule> ParseWeightRule(const std::string& s) {
  if (s == "fixed") return WeightRule::kFixed;
  if (s == "staleness") return WeightRule::kStaleness;
  return Status::InvalidArgument(
      fmt::format("unknown weight rule '{}' (expected fixed or staleness)", s));
}

Result<std::vector<float>> ParseWeights(const std::string& s) {
  std::vector<float> out;
  if (s.empty()) return out;
  size_t pos = 0;
  while (pos <= s.size()) {
    size_t end = s.find(',', pos);
    if (end == std::string::npos) end = s.size();
    std::string item = s.substr(pos, end - pos);
    float v = 0;
    auto [p, ec] = std::from_chars(item.data(), item.data() + item.size(), v);
    if (item.empty() || ec != std::errc() || p != item.data() + item.size() || !std::isfinite(v) ||
        v < 0 || v > 1000)
      return Status::InvalidArgument(fmt::format(
          "worker weights '{}': '{}' is not a number in [0, 1000] (expected e.g. 1,0.5,1)", s,
          item));
    out.push_back(v);
    if (end == s.size()) break;
    pos = end + 1;
  }
  return out;
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

Status CheckLearningRate(float lr) {
  if (std::isfinite(lr) && lr >= 0.0f) return Status::OK();
  return Status::InvalidArgument(fmt::format("learning rate {} is not a finite number >= 0", lr));
}

Status OptimizerConfig::Validate() const {
  SHARDPS_RETURN_IF_ERROR(CheckLearningRate(lr));
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

const char* CodecName(Codec c) {
  switch (c) {
    case Codec::kNone:
      return "none";
    case Codec::kFp16:
      return "fp16";
    case Codec::kBf16:
      return "bf16";
    case Codec::kInt8:
      return "int8";
    case Codec::kOneBit:
      return "onebit";
    case Codec::kTopK:
      return "topk";
  }
  return "?";
}

namespace {

bool ParseUint(std::string_view v, uint64_t* out) {
  auto [p, ec] = std::from_chars(v.data(), v.data() + v.size(), *out);
  return ec == std::errc() && p == v.data() + v.size() && !v.empty();
}

bool ParseRatio(std::string_view v, double* out) {
  bool percent = !v.empty() && v.back() == '%';
  if (percent) v.remove_suffix(1);
  if (v.empty()) return false;
  std::string t(v);
  char* end = nullptr;
  double d = std::strtod(t.c_str(), &end);
  if (end != t.c_str() + t.size()) return false;
  *out = percent ? d / 100.0 : d;
  return true;
}

}  // namespace

constexpr uint64_t kDefaultMinNumel = 16384;  // onebit, topk: 64 KiB of fp32

Result<Compression> Compression::Parse(const std::string& text) {
  Compression c;
  std::string_view s(text);
  std::string_view name = s.substr(0, s.find(':'));
  std::string_view opts = name.size() < s.size() ? s.substr(name.size() + 1) : std::string_view();
  bool found = false;
  for (Codec k :
       {Codec::kNone, Codec::kFp16, Codec::kBf16, Codec::kInt8, Codec::kOneBit, Codec::kTopK}) {
    if (name == CodecName(k)) {
      c.codec = k;
      found = true;
    }
  }
  if (!found)
    return Status::InvalidArgument(fmt::format(
        "unknown compression '{}' (expected none, fp16, bf16, int8, onebit or topk)", name));
  c.error_feedback = c.codec == Codec::kOneBit || c.codec == Codec::kTopK;
  c.min_numel = c.error_feedback ? kDefaultMinNumel : 0;
  auto bad = [&](std::string_view o, const char* why) {
    return Status::InvalidArgument(fmt::format("compression '{}': option '{}' {}", text, o, why));
  };
  while (!opts.empty()) {
    std::string_view o = opts.substr(0, opts.find(','));
    opts = o.size() < opts.size() ? opts.substr(o.size() + 1) : std::string_view();
    auto eq = o.find('=');
    std::string_view key = eq == std::string_view::npos ? std::string_view() : o.substr(0, eq);
    std::string_view val = eq == std::string_view::npos ? o : o.substr(eq + 1);
    uint64_t n = 0;
    if (key == "min") {
      if (!ParseUint(val, &n)) return bad(o, "is not min=N with N a number of elements");
      c.min_numel = n;
    } else if (key == "ef") {
      if (val != "on" && val != "off") return bad(o, "must be ef=on or ef=off");
      c.error_feedback = val == "on";
    } else if (c.codec == Codec::kInt8 || c.codec == Codec::kOneBit) {
      if ((!key.empty() && key != "block") || !ParseUint(val, &n) || n == 0 || n > (1u << 20))
        return bad(o, "is not block=N with N in [1, 1048576]");
      c.block = static_cast<uint32_t>(n);
    } else if (c.codec == Codec::kTopK) {
      if (key == "k" || (key.empty() && val.find_first_of(".%") == std::string_view::npos)) {
        if (!ParseUint(val, &n) || n == 0) return bad(o, "is not a positive count");
        c.count = n;
      } else if (key == "warmup") {
        if (!ParseUint(val, &n) || n > (1ull << 32))
          return bad(o, "is not warmup=N with N a number of pushes");
        c.warmup = n;
      } else if (key.empty() || key == "ratio") {
        double r = 0;
        if (!ParseRatio(val, &r) || !(r > 0.0 && r <= 0.5))
          return bad(o, "is not a fraction in (0, 0.5] (e.g. 0.01 or 1%)");
        c.ratio = r;
        c.count = 0;
      } else {
        return bad(o, "is unknown (expected k=N, ratio=R, warmup=N, min=N or ef=on|off)");
      }
    } else {
      return bad(o, "is unknown for this codec (only ef=on|off)");
    }
  }
  SHARDPS_RETURN_IF_ERROR(c.Validate());
  return c;
}

std::string Compression::ToString() const {
  std::string s = CodecName(codec);
  bool ef_default = codec == Codec::kOneBit || codec == Codec::kTopK;
  std::string opts;
  if (codec == Codec::kInt8 || codec == Codec::kOneBit) opts = fmt::format("block={}", block);
  if (codec == Codec::kTopK)
    opts = count ? fmt::format("k={}", count) : fmt::format("ratio={}", ratio);
  if (codec == Codec::kTopK && warmup) opts += fmt::format(",warmup={}", warmup);
  if (error_feedback != ef_default) {
    if (!opts.empty()) opts += ",";
    opts += error_feedback ? "ef=on" : "ef=off";
  }
  if (min_numel != (ef_default ? kDefaultMinNumel : 0)) {
    if (!opts.empty()) opts += ",";
    opts += fmt::format("min={}", min_numel);
  }
  return opts.empty() ? s : s + ":" + opts;
}

Status Compression::Validate() const {
  if (static_cast<uint8_t>(codec) > static_cast<uint8_t>(Codec::kTopK))
    return Status::InvalidArgument(fmt::format("unknown codec {}", static_cast<int>(codec)));
  if ((codec == Codec::kInt8 || codec == Codec::kOneBit) && (block == 0 || block > (1u << 20)))
    return Status::InvalidArgument(fmt::format("compression block {} outside [1, 1048576]", block));
  if (codec == Codec::kTopK && count == 0 && !(ratio > 0.0 && ratio <= 0.5))
    return Status::InvalidArgument(fmt::format("topk ratio {} outside (0, 0.5]", ratio));
  return Status::OK();
}

Compression Compression::AtPush(uint64_t tensor_numel, uint64_t push) const {
  if (codec != Codec::kTopK || warmup == 0 || push >= warmup || tensor_numel == 0) return *this;
  const double n = static_cast<double>(tensor_numel);
  const double target = count ? static_cast<double>(count) / n : ratio;
  if (target >= kWarmupStartRatio) return *this;
  // Geometric from the start ratio to the target over `warmup` pushes.
  const double f = static_cast<double>(push) / static_cast<double>(warmup);
  const double r = kWarmupStartRatio * std::pow(target / kWarmupStartRatio, f);
  Compression c = *this;
  c.count = std::max<uint64_t>(count ? count : static_cast<uint64_t>(std::llround(ratio * n)),
                               static_cast<uint64_t>(std::llround(r * n)));
  c.count = std::max<uint64_t>(c.count, 1);
  return c;
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
