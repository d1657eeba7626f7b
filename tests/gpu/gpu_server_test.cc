// Servers whose chunks live on a device (--device, docs/gpu.md), in whole jobs: on the host twin
// everywhere (the code path of a GPU server with the kernels' arithmetic run by host threads), and
// on GPU 0 where there is one (skipped with the reason elsewhere).
#include <nlohmann/json.hpp>

#include "gpu/device.h"
#include "support/exact_values.h"
#include "support/local_cluster.h"

namespace shardps {
namespace {

using namespace std::chrono_literals;
using testing::Grad;
using testing::LocalCluster;
using testing::Opts;
using testing::Sgd1;

std::vector<std::string> Devices() {
  std::vector<std::string> out{"twin"};
  if (gpu::OpenCudaDevice(0, 1).ok()) out.push_back("cuda");
  return out;
}

std::function<void(ServerOptions&)> On(const std::string& device) {
  return [device](ServerOptions& so) { so.device = device; };
}

// Integer-valued pushes from 3 workers to 2 servers, tensors of several chunks and of one small
// chunk (through batches and through landing buffers): exact parameters after every step.
TEST(DeviceServer, ExactValuesInSyncAndAsync) {
  for (const std::string& device : Devices()) {
    for (Mode mode : {Mode::kSync, Mode::kAsync}) {
      for (const char* transport : {"tcp", "tcp+nobatch"}) {
        SCOPED_TRACE(device + " " + ModeName(mode) + " " + transport);
        auto lc = LocalCluster::Start(Opts(2, 3, mode, Aggregate::kSum, 4096), 16, transport, 1,
                                      On(device));
        ASSERT_TRUE(lc);
        constexpr uint64_t kSteps = 3;
        const std::vector<int64_t> sizes = {5000, 3, 700};
        lc->ForEachWorker([&](Worker& w) {
          std::vector<TensorSpec> specs;
          for (size_t k = 0; k < sizes.size(); ++k)
            specs.push_back(Sgd1("t" + std::to_string(k), sizes[k], static_cast<float>(k) * 100));
          auto ids = w.Declare(specs);
          ASSERT_TRUE(ids.ok()) << ids.status().ToString();
          for (uint64_t s = 1; s <= kSteps; ++s) {
            std::vector<std::vector<float>> g(sizes.size()), out(sizes.size());
            std::vector<Handle> hs;
            for (size_t k = 0; k < sizes.size(); ++k) {
              g[k].resize(sizes[k]);
              out[k].assign(sizes[k], -1.0f);
              for (int64_t i = 0; i < sizes[k]; ++i) g[k][i] = Grad(w.rank(), s, i);
              hs.push_back(w.PushPull((*ids)[k], g[k].data(), out[k].data()));
            }
            // Every operation is waited for before any check may return: none still writes
            // into `out` once it is gone.
            std::vector<Status> done;
            for (auto& h : hs) done.push_back(h.Wait(60s));
            for (size_t k = 0; k < sizes.size(); ++k) {
              ASSERT_TRUE(done[k].ok()) << done[k].ToString();
              if (mode != Mode::kSync) continue;
              ASSERT_EQ(hs[k].version(), s);
              for (int64_t i = 0; i < sizes[k]; ++i) {
                float expect = static_cast<float>(k) * 100;
                for (uint64_t t = 1; t <= s; ++t)
                  for (uint32_t ww = 0; ww < 3; ++ww) expect -= Grad(ww, t, i);
                ASSERT_EQ(out[k][i], expect) << "tensor " << k << " element " << i;
              }
            }
          }
          ASSERT_TRUE(w.Barrier("pushed", 60s).ok());
          for (size_t k = 0; k < sizes.size(); ++k) {
            std::vector<float> out(sizes[k], -1.0f);
            auto h = w.Pull((*ids)[k], out.data());
            ASSERT_TRUE(h.Wait(60s).ok());
            EXPECT_EQ(h.version(), mode == Mode::kSync ? kSteps : 3 * kSteps);
            for (int64_t i = 0; i < sizes[k]; ++i) {
              float expect = static_cast<float>(k) * 100;
              for (uint64_t t = 1; t <= kSteps; ++t)
                for (uint32_t ww = 0; ww < 3; ++ww) expect -= Grad(ww, t, i);
              ASSERT_EQ(out[i], expect) << "tensor " << k << " element " << i;
            }
          }
        });
        for (auto& s : lc->servers) {
          auto stats = nlohmann::json::parse(s->stats().ToJson());
          EXPECT_EQ(stats["device"].get<std::string>().substr(0, device.size()), device);
          EXPECT_EQ(stats["chunks"].get<uint64_t>() > 0, true);
        }
      }
    }
  }
}

// The same job, adam with int8 pushes and fp16 pulls, on a CPU server and on a device server:
// what the workers pull after every step agrees bit for bit.
TEST(DeviceServer, CompressedAdamJobMatchesACpuServer) {
  for (const std::string& device : Devices()) {
    SCOPED_TRACE(device);
    std::vector<std::vector<float>> pulled[2];
    for (int run = 0; run < 2; ++run) {
      auto lc = LocalCluster::Start(Opts(1, 2, Mode::kSync, Aggregate::kMean, 8192), 16, "tcp", 1,
                                    On(run == 0 ? "cpu" : device));
      ASSERT_TRUE(lc);
      std::mutex mu;
      lc->ForEachWorker([&](Worker& w) {
        TensorSpec t = Sgd1("w", 6000, 0.5f);
        t.optimizer.kind = OptimizerKind::kAdam;
        t.optimizer.lr = 0.01f;
        t.optimizer.weight_decay = 0.001f;
        t.compression = Compression::Parse("int8").value();
        t.pull_codec = Codec::kFp16;
        auto ids = w.Declare({t});
        ASSERT_TRUE(ids.ok()) << ids.status().ToString();
        for (uint64_t s = 1; s <= 4; ++s) {
          std::vector<float> g(6000), out(6000);
          for (size_t i = 0; i < g.size(); ++i)
            g[i] = 0.01f * Grad(w.rank(), s, i) + 0.001f * static_cast<float>(i % 101);
          auto h = w.PushPull(*ids, g.data(), out.data());
          ASSERT_TRUE(h.Wait(60s).ok()) << h.Wait(0ms).ToString();
          ASSERT_EQ(h.version(), s);
          if (w.rank() == 0) {
            std::lock_guard<std::mutex> lock(mu);
            pulled[run].push_back(out);
          }
        }
      });
    }
    ASSERT_EQ(pulled[0].size(), 4u);
    ASSERT_EQ(pulled[1].size(), 4u);
    for (size_t s = 0; s < 4; ++s) {
      ASSERT_EQ(pulled[0][s], pulled[1][s]) << "step " << s + 1;
      EXPECT_NE(pulled[0][s][0], 0.5f);  // it moved
    }
  }
}

// A chunk that does not fit in the device's memory is refused when the tensor is declared, with
// a message that says how much it needs and has; the server stays up for tensors that fit.
TEST(DeviceServer, AChunkThatDoesNotFitIsRefusedAtDeclare) {
  auto lc = LocalCluster::Start(Opts(1, 1, Mode::kSync, Aggregate::kSum, 4 << 20), 4, "tcp", 1,
                                On("twin:8MiB"));
  ASSERT_TRUE(lc);
  Worker& w = *lc->workers[0];
  TensorSpec big = Sgd1("big", 1 << 20, 1.0f);  // 4 MiB: params, publish, accumulator, staging
  auto refused = w.Declare({big});
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.status().message().find("needs"), std::string::npos)
      << refused.status().ToString();
  EXPECT_NE(refused.status().message().find("on twin, which has"), std::string::npos)
      << refused.status().ToString();
  auto ids = w.Declare({Sgd1("small", 1000, 1.0f)});
  ASSERT_TRUE(ids.ok()) << ids.status().ToString();
  std::vector<float> g(1000, 2.0f), out(1000);
  auto h = w.PushPull(*ids, g.data(), out.data());
  ASSERT_TRUE(h.Wait(30s).ok());
  EXPECT_EQ(out[0], -1.0f);
}

}  // namespace
}  // namespace shardps
