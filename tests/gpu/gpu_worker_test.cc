// GPU memory in the worker and the NCCL node reducer (docs/node-reduction.md, "GPU memory").
// They need a GPU (two for NCCL) and skip with the reason elsewhere; what runs everywhere is the
// loading of CUDA and NCCL, which must say why it cannot rather than fail.
#include <nlohmann/json.hpp>

#include "gpu/cuda.h"
#include "support/exact_values.h"
#include "support/local_cluster.h"

namespace shardps {
namespace {

using namespace std::chrono_literals;
using testing::LocalCluster;

using testing::Grad;
using testing::Opts;
using testing::Sgd1;

// The CUDA runtime with at least `gpus` GPUs, or the reason to skip.
std::shared_ptr<gpu::Cuda> Gpus(int gpus, std::string* why) {
  auto c = gpu::Cuda::Load();
  if (!c.ok()) {
    *why = c.status().ToString();
    return nullptr;
  }
  if ((*c)->device_count() < gpus) {
    *why = "fewer than " + std::to_string(gpus) + " GPUs";
    return nullptr;
  }
  return *c;
}

TEST(GpuRuntime, LoadsOrSaysWhyNot) {
  auto c = gpu::Cuda::Load();
  if (c.ok()) {
    EXPECT_GT((*c)->device_count(), 0);
    int host = 0;
    EXPECT_FALSE((*c)->IsDevice(&host));
  } else {
    EXPECT_TRUE(c.status().IsNotFound()) << c.status().ToString();
    EXPECT_FALSE(c.status().message().empty());
  }
  auto n = gpu::Nccl::Load();
  if (n.ok()) {
    EXPECT_FALSE((*n)->version().empty());
  } else {
    EXPECT_TRUE(n.status().IsNotFound()) << n.status().ToString();
  }
}

// A buffer of n floats in GPU memory, filled from the host.
struct DeviceFloats {
  std::shared_ptr<gpu::Cuda> cuda;
  float* p = nullptr;
  size_t n = 0;
  DeviceFloats(std::shared_ptr<gpu::Cuda> c, const std::vector<float>& v)
      : cuda(std::move(c)), n(v.size()) {
    auto a = cuda->DeviceAlloc(n * 4);
    EXPECT_TRUE(a.ok());
    p = static_cast<float*>(*a);
    EXPECT_TRUE(cuda->Copy(p, v.data(), n * 4).ok());
  }
  ~DeviceFloats() { cuda->DeviceFree(p); }
  std::vector<float> Read() const {
    std::vector<float> v(n);
    EXPECT_TRUE(cuda->Copy(v.data(), p, n * 4).ok());
    return v;
  }
};

// Every worker pushes and pulls GPU memory (staged through pinned host buffers, or with `nccl`
// reduced over the node's GPUs): the parameters are exactly the sum of all pushes.
void RunExact(const std::shared_ptr<gpu::Cuda>& cuda, uint32_t workers, uint32_t per_node,
              const std::string& reducer) {
  auto lc = LocalCluster::Start(Opts(2, workers, Mode::kSync, Aggregate::kSum, 4096), 16, "tcp", 1,
                                nullptr, [&](WorkerOptions& o) {
                                  if (per_node < 2) return;
                                  o.local_size = per_node;
                                  o.local_rank = o.rank % static_cast<int32_t>(per_node);
                                  o.node = "gpu-node" +
                                           std::to_string(o.rank / static_cast<int32_t>(per_node));
                                  o.node_reducer = reducer;
                                });
  ASSERT_TRUE(lc);
  const std::vector<int64_t> sizes = {5000, 3, 1 << 16};
  lc->ForEachWorker([&](Worker& w) {
    std::vector<TensorSpec> specs;
    for (size_t k = 0; k < sizes.size(); ++k)
      specs.push_back(Sgd1("g" + std::to_string(k), sizes[k], 0.0f));
    auto ids = w.Declare(specs);
    ASSERT_TRUE(ids.ok()) << ids.status().ToString();
    for (uint64_t s = 1; s <= 3; ++s)
      for (size_t k = 0; k < sizes.size(); ++k) {
        std::vector<float> g(sizes[k]);
        for (int64_t i = 0; i < sizes[k]; ++i) g[i] = Grad(w.rank(), s, i);
        DeviceFloats dg(cuda, g), dout(cuda, std::vector<float>(sizes[k], -1.0f));
        auto h = w.PushPull((*ids)[k], dg.p, dout.p);
        ASSERT_TRUE(h.Wait(60s).ok()) << h.Wait(0ms).ToString();
        ASSERT_EQ(h.version(), s);
        const auto out = dout.Read();
        for (int64_t i = 0; i < sizes[k]; ++i) {
          float expect = 0;
          for (uint64_t t = 1; t <= s; ++t)
            for (uint32_t ww = 0; ww < workers; ++ww) expect -= Grad(ww, t, i);
          ASSERT_EQ(out[i], expect) << "tensor " << k << " element " << i << " step " << s;
        }
      }
  });
  lc->Finish();
}

TEST(GpuWorker, PushPullOfGpuMemoryIsExact) {
  std::string why;
  auto cuda = Gpus(1, &why);
  if (!cuda) GTEST_SKIP() << "needs a GPU: " << why;
  RunExact(cuda, 2, 1, "auto");
}

TEST(GpuNodeReduction, SharedMemoryReducerStagesGpuMemory) {
  std::string why;
  auto cuda = Gpus(1, &why);
  if (!cuda) GTEST_SKIP() << "needs a GPU: " << why;
  RunExact(cuda, 4, 2, "shm");
}

TEST(GpuNodeReduction, NcclReducerOverTwoGpusIsExact) {
  std::string why;
  auto cuda = Gpus(2, &why);
  if (!cuda) GTEST_SKIP() << "needs two GPUs: " << why;
  if (auto n = gpu::Nccl::Load(); !n.ok()) GTEST_SKIP() << n.status().ToString();
  RunExact(cuda, 4, 2, "nccl");
}

}  // namespace
}  // namespace shardps
