// The server's decode + accumulate + Adam on the CPU, per codec, against memcpy measured in the
// same run (issue "Compressed gradients", docs/perf.md). For a chunk of n floats, one thread:
//   accumulate: sum += decode(push)          bytes = encoded + 4n read, 4n written
//   update:     Adam(p, decode(push) + sum)  bytes = encoded + 4n (sum) + 12n (p, m, v) read,
//                                                    12n (p, m, v) written
//   sync step:  a step of 4 workers as the engine runs it: the first push assigned to the sum,
//               two added, the last decoded into Adam with the sum (the goal's figure)
// Each is reported in GB/s of those bytes (topk's additions count the k elements they touch)
// and as a ratio to memcpy's GB/s (read + written) over a buffer of the same bytes, measured
// right after it; the median of the repetitions. Writes a JSON report if given a path.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "compress/codec.h"
#include "server/update_rule.h"

using namespace shardps;
using Clock = std::chrono::steady_clock;

namespace {

template <typename F>
double MedianSeconds(int reps, F&& f) {
  std::vector<double> t;
  for (int r = 0; r < reps; ++r) {
    auto t0 = Clock::now();
    f();
    t.push_back(std::chrono::duration<double>(Clock::now() - t0).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// memcpy's rate (bytes read + written per second) copying `bytes` bytes.
double MemcpyRate(uint64_t bytes, int reps) {
  std::vector<uint8_t> a(bytes, 1), b(bytes, 2);
  double s = MedianSeconds(reps, [&] {
    std::memcpy(b.data(), a.data(), bytes);
    asm volatile("" : : "r"(b.data()) : "memory");
  });
  return 2.0 * static_cast<double>(bytes) / s;
}

}  // namespace

int main(int argc, char** argv) {
  uint64_t n = argc > 1 ? std::stoull(argv[1]) : (1u << 20);  // 4 MiB of floats
  int reps = argc > 2 ? std::stoi(argv[2]) : 30;
  std::mt19937 rng(1);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> grad(n), params(n), sum(n);
  for (auto& x : grad) x = d(rng);
  for (auto& x : params) x = d(rng);
  for (auto& x : sum) x = d(rng);
  OptimizerConfig adam;
  adam.kind = OptimizerKind::kAdam;
  adam.lr = 1e-4f;
  nlohmann::json rows = nlohmann::json::array();
  double worst = 1e9;
  std::printf("%-8s %10s %15s %6s %15s %6s %15s %6s %13s\n", "codec", "encoded", "accumulate",
              "ratio", "update(adam)", "ratio", "sync step (4)", "ratio", "encode+ef");
  for (Codec c :
       {Codec::kNone, Codec::kFp16, Codec::kBf16, Codec::kInt8, Codec::kOneBit, Codec::kTopK}) {
    compress::ChunkCodec cc{c, 256, n / 100};
    std::vector<uint8_t> enc(compress::EncodedBytes(cc, n));
    compress::Encode(cc, grad.data(), n, enc.data(), nullptr);
    server::GradientView g{enc.data(), enc.size(), n, server::Dtype::kFloat32, c, 256};
    server::GradientView extra{sum.data(), n * 4, n, server::Dtype::kFloat32, Codec::kNone, 256};
    auto rule = server::MakeCpuUpdateRule(adam, n, nullptr, 0, "bench");
    std::vector<float> acc(sum);
    const double e = static_cast<double>(enc.size());
    // topk's accumulation touches only its k elements.
    const double touched = c == Codec::kTopK ? static_cast<double>(cc.k) : static_cast<double>(n);
    const double acc_bytes = e + 8.0 * touched, upd_bytes = e + 28.0 * n;
    // The worker's side: encoding with error feedback, in GB/s of fp32 gradient.
    std::vector<float> residual(n, 0.0f);
    std::vector<uint8_t> scratch(enc.size());
    double te = MedianSeconds(
        reps, [&] { compress::Encode(cc, grad.data(), n, scratch.data(), residual.data()); });
    double ta = MedianSeconds(reps, [&] { rule->Fold(acc.data(), g, false); });
    // A whole sync step of 4 workers: the first push assigned to the sum, two added, the last
    // decoded into Adam with the sum (the engine's order).
    const double dense_add = c == Codec::kTopK ? 8.0 * cc.k : 8.0 * n;
    const double step_bytes = 4 * e + 4.0 * n + 2 * dense_add + 28.0 * n;
    double ts = MedianSeconds(reps, [&] {
      rule->Fold(acc.data(), g, true);
      rule->Fold(acc.data(), g, false);
      rule->Fold(acc.data(), g, false);
      server::GradientView s{acc.data(), n * 4, n, server::Dtype::kFloat32, Codec::kNone, 256};
      rule->Apply(params.data(), params.data(), g, &s, 0.25f, std::nullopt, nullptr, [](Status) {});
    });
    double ms = MemcpyRate(static_cast<uint64_t>(step_bytes / 2), reps);
    double rs = step_bytes / ts / ms;
    double tu = MedianSeconds(reps, [&] {
      rule->Apply(params.data(), params.data(), g, &extra, 0.5f, std::nullopt, nullptr,
                  [](Status) {});
    });
    // memcpy of the same bytes, measured beside each (the machine is shared and noisy).
    double ma = MemcpyRate(static_cast<uint64_t>(acc_bytes / 2), reps);
    double mu = MemcpyRate(static_cast<uint64_t>(upd_bytes / 2), reps);
    double ra = acc_bytes / ta / ma, ru = upd_bytes / tu / mu;
    worst = std::min(worst, rs);
    std::printf("%-8s %10zu %10.2f GB/s %6.2f %10.2f GB/s %6.2f %10.2f GB/s %6.2f %8.2f GB/s\n",
                CodecName(c), enc.size(), acc_bytes / ta / 1e9, ra, upd_bytes / tu / 1e9, ru,
                step_bytes / ts / 1e9, rs, 4.0 * n / te / 1e9);
    rows.push_back({{"codec", CodecName(c)},
                    {"numel", n},
                    {"encoded_bytes", enc.size()},
                    {"accumulate_gbs", acc_bytes / ta / 1e9},
                    {"accumulate_memcpy_gbs", ma / 1e9},
                    {"accumulate_ratio", ra},
                    {"update_gbs", upd_bytes / tu / 1e9},
                    {"update_memcpy_gbs", mu / 1e9},
                    {"update_ratio", ru},
                    {"sync_step_gbs", step_bytes / ts / 1e9},
                    {"sync_step_memcpy_gbs", ms / 1e9},
                    {"sync_step_ratio", rs},
                    {"encode_gbs", 4.0 * n / te / 1e9}});
  }
  std::printf("worst sync-step ratio to memcpy: %.2f (goal >= 0.60)\n", worst);
  nlohmann::json report = {{"codecs", rows}, {"worst_sync_step_ratio", worst}, {"reps", reps}};
  if (argc > 3) {
    FILE* f = std::fopen(argv[3], "w");
    if (!f) return 1;
    std::fprintf(f, "%s\n", report.dump(2).c_str());
    std::fclose(f);
  }
  return 0;
}
