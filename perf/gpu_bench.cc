// The fused update kernels against the device's own copy bandwidth (docs/gpu.md, docs/perf.md):
// for every optimizer and codec and each chunk size, the bytes an update must read and write
// (parameters, optimizer state, the encoded gradient, the published copy) per second, as a
// fraction of what a device-to-device copy moves per second (read + write) in the same run.
// Usage: gpu_bench [--device cuda:0|twin] [--sizes 4,16,64,256] (MiB of fp32 parameters)
//                  [--iters N] [--report FILE.json]
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "compress/codec.h"
#include "gpu/device.h"
#include "server/optimizer.h"

namespace {

using namespace shardps;
using Clock = std::chrono::steady_clock;

struct Opt {
  const char* name;
  int code;
  bool nesterov;
  int state_arrays;
};
constexpr Opt kOpts[] = {{"sgd", server::kOptSgd, false, 0},
                         {"momentum", server::kOptMomentum, false, 1},
                         {"nesterov", server::kOptMomentum, true, 1},
                         {"adam", server::kOptAdam, false, 2},
                         {"adagrad", server::kOptAdagrad, false, 1}};
constexpr Codec kCodecs[] = {Codec::kNone, Codec::kFp16,   Codec::kBf16,
                             Codec::kInt8, Codec::kOneBit, Codec::kTopK};

int Fail(const std::string& what) {
  std::fprintf(stderr, "gpu_bench: %s\n", what.c_str());
  return 1;
}

}  // namespace

int main(int argc, char** argv) {
  std::string device_spec = "cuda:0", report;
  std::vector<uint64_t> sizes_mib = {4, 16, 64, 256};
  int iters = 20;
  for (int i = 1; i < argc; ++i) {
    std::string a = argv[i];
    auto next = [&]() -> std::string { return i + 1 < argc ? argv[++i] : ""; };
    if (a == "--device") {
      device_spec = next();
    } else if (a == "--report") {
      report = next();
    } else if (a == "--iters") {
      iters = std::max(1, std::atoi(next().c_str()));
    } else if (a == "--sizes") {
      sizes_mib.clear();
      std::string list = next();
      for (size_t p = 0; p < list.size();) {
        size_t q = list.find(',', p);
        if (q == std::string::npos) q = list.size();
        sizes_mib.push_back(std::stoull(list.substr(p, q - p)));
        p = q + 1;
      }
    } else {
      return Fail("unknown argument " + a + " (expected --device, --sizes, --iters, --report)");
    }
  }
  gpu::DeviceSpec spec;
  if (Status st = gpu::ParseDevice(device_spec, &spec); !st.ok()) return Fail(st.ToString());
  std::shared_ptr<gpu::Device> dev;
  if (spec.twin) {
    dev = gpu::MakeTwinDevice(1, spec.twin_bytes);
  } else if (spec.gpu >= 0) {
    auto d = gpu::OpenCudaDevice(spec.gpu, 1);
    if (!d.ok()) return Fail(d.status().ToString());
    dev = *d;
  } else {
    return Fail("--device must be cuda[:N] or twin");
  }
  auto alloc = [&](size_t bytes) -> void* {
    auto p = dev->Alloc(bytes);
    if (!p.ok()) {
      std::fprintf(stderr, "gpu_bench: %s\n", p.status().ToString().c_str());
      std::exit(1);
    }
    return *p;
  };
  // A failed copy or launch ends the run: a kernel that never ran would time as fast as nothing.
  auto must = [](const Status& st) {
    if (!st.ok()) {
      std::fprintf(stderr, "gpu_bench: %s\n", st.ToString().c_str());
      std::exit(1);
    }
  };
  auto wait = [&]() {
    if (Status st = dev->Wait(0, std::chrono::minutes(5)); !st.ok()) {
      std::fprintf(stderr, "gpu_bench: %s\n", st.ToString().c_str());
      std::exit(1);
    }
  };
  // Seconds per run of fn, after one warm-up run.
  auto time = [&](const std::function<void()>& fn) {
    fn();
    wait();
    auto t0 = Clock::now();
    for (int k = 0; k < iters; ++k) fn();
    wait();
    return std::chrono::duration<double>(Clock::now() - t0).count() / iters;
  };

  nlohmann::json rows = nlohmann::json::array();
  std::printf("device %s, %d iterations each\n", dev->name().c_str(), iters);
  std::mt19937 rng(1);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (uint64_t mib : sizes_mib) {
    const uint64_t n = (mib << 20) / 4, bytes = n * 4;
    std::vector<float> host(n);
    for (auto& x : host) x = normal(rng);
    auto* params = static_cast<float*>(alloc(bytes));
    auto* m = static_cast<float*>(alloc(bytes));
    auto* v = static_cast<float*>(alloc(bytes));
    auto* publish = alloc(bytes);
    auto* copy_dst = alloc(bytes);
    auto* grad = static_cast<uint8_t*>(alloc(bytes));
    std::vector<float> zeros(n, 0.0f);
    must(dev->Copy(params, host.data(), bytes, 0));
    must(dev->Copy(m, zeros.data(), bytes, 0));
    must(dev->Copy(v, zeros.data(), bytes, 0));
    wait();
    const double copy_s = time([&] { must(dev->Copy(copy_dst, params, bytes, 0)); });
    const double copy_gbps = 2.0 * static_cast<double>(bytes) / copy_s / 1e9;
    std::printf("%4llu MiB: device-to-device copy %.1f GB/s (read + write)\n",
                static_cast<unsigned long long>(mib), copy_gbps);
    for (Codec codec : kCodecs) {
      compress::ChunkCodec cc{codec, 256, codec == Codec::kTopK ? n / 100 : 0};
      std::vector<uint8_t> enc(compress::EncodedBytes(cc, n));
      compress::Encode(cc, host.data(), n, enc.data(), nullptr);
      must(dev->Copy(grad, enc.data(), enc.size(), 0));
      wait();
      for (const Opt& o : kOpts) {
        OptimizerConfig cfg;
        cfg.kind = static_cast<OptimizerKind>(o.code);
        cfg.nesterov = o.nesterov;
        cfg.lr = 1e-6f;
        gpu::UpdateArgs a;
        a.params = params;
        a.m = m;
        a.v = v;
        a.grad = {grad, n, 256, 1.0f};
        a.publish = publish;
        a.publish_codec = 0;
        a.numel = n;
        a.k = server::MakeStepParams(cfg, 1.0f, 1, std::nullopt);
        const double s = time([&] { must(dev->Update(o.code, static_cast<int>(codec), a, 0)); });
        // Parameters read and written, state read and written, the gradient read, the
        // published copy written.
        const double moved = static_cast<double>(
            8 * n + 8 * n * static_cast<uint64_t>(o.state_arrays) + enc.size() + 4 * n);
        const double gbps = moved / s / 1e9;
        std::printf("  %-8s %-6s %8.1f GB/s  %5.2f of copy  (%.3f ms)\n", o.name, CodecName(codec),
                    gbps, gbps / copy_gbps, s * 1e3);
        rows.push_back({{"device", dev->name()},
                        {"chunk_mib", mib},
                        {"optimizer", o.name},
                        {"codec", CodecName(codec)},
                        {"bytes_moved", moved},
                        {"seconds", s},
                        {"gbps", gbps},
                        {"copy_gbps", copy_gbps},
                        {"fraction_of_copy", gbps / copy_gbps}});
      }
    }
    for (void* p : {static_cast<void*>(params), static_cast<void*>(m), static_cast<void*>(v),
                    publish, copy_dst, static_cast<void*>(grad)})
      dev->Free(p);
  }
  if (!report.empty()) {
    std::ofstream f(report);
    f << nlohmann::json{{"device", dev->name()}, {"iterations", iters}, {"results", rows}}.dump(2)
      << "\n";
    if (!f) return Fail("cannot write " + report);
  }
  return 0;
}
