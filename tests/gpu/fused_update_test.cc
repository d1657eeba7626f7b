// The fused update of GPU-resident chunks (docs/gpu.md). What runs everywhere: the host twin of
// the kernels against the CPU update rule, element for element, for every codec and optimizer; and
// the device update rule on the twin device through the chunk engine (exact integer values,
// versions, published slots). What needs a GPU (and skips with the reason elsewhere): the kernels
// against the twin on random data, and the device rule on the GPU.
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <limits>
#include <mutex>
#include <random>

#include <gtest/gtest.h>

#include "compress/codec.h"
#include "gpu/device.h"
#include "server/chunk_engine.h"
#include "server/optimizer.h"
#include "server/update_rule.h"

namespace shardps {
namespace {

using namespace std::chrono_literals;
using server::GradientView;
using server::OptimizerState;

constexpr uint64_t kN = 3000;  // not a multiple of a block (256), a topk tile (1024) or 8

struct Case {
  const char* name;
  OptimizerConfig opt;
};

std::vector<Case> Optimizers() {
  std::vector<Case> out;
  OptimizerConfig o;
  o.lr = 0.05f;
  o.weight_decay = 0.01f;
  o.kind = OptimizerKind::kSgd;
  out.push_back({"sgd", o});
  o.kind = OptimizerKind::kMomentum;
  out.push_back({"momentum", o});
  o.nesterov = true;
  out.push_back({"nesterov", o});
  o.nesterov = false;
  o.kind = OptimizerKind::kAdam;
  out.push_back({"adam", o});
  o.kind = OptimizerKind::kAdagrad;
  o.initial_accumulator = 0.1f;
  out.push_back({"adagrad", o});
  return out;
}

const Codec kCodecs[] = {Codec::kNone, Codec::kFp16,   Codec::kBf16,
                         Codec::kInt8, Codec::kOneBit, Codec::kTopK};

std::vector<float> Random(std::mt19937* rng, uint64_t n, float scale = 1.0f) {
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(*rng);
  return v;
}

// A gradient as a worker pushes it: encoded with `codec` (block 256, topk 10%).
std::vector<uint8_t> Encoded(Codec codec, const std::vector<float>& x) {
  compress::ChunkCodec c{codec, 256, codec == Codec::kTopK ? x.size() / 10 : 0};
  std::vector<uint8_t> out(compress::EncodedBytes(c, x.size()));
  compress::Encode(c, x.data(), x.size(), out.data(), nullptr);
  return out;
}

GradientView View(Codec codec, const std::vector<uint8_t>& bytes, float weight) {
  GradientView g;
  g.data = bytes.data();
  g.bytes = bytes.size();
  g.numel = kN;
  g.encoding = codec;
  g.block = 256;
  g.weight = weight;
  return g;
}

gpu::EncodedGrad EncodedOf(const GradientView& g) {
  gpu::EncodedGrad e;
  e.data = static_cast<const uint8_t*>(g.data);
  e.numel = g.numel;
  e.block = g.block;
  e.weight = g.weight;
  return e;
}

// Equal as values, and never NaN: the bound of the twin against the CPU rule is 0 (the same
// functions, compiled by the same compiler without FMA contraction).
void ExpectSame(const std::vector<float>& want, const std::vector<float>& got, const char* what) {
  ASSERT_EQ(want.size(), got.size());
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_FALSE(std::isnan(got[i])) << what << " element " << i;
    ASSERT_EQ(want[i], got[i]) << what << " element " << i;
  }
}

std::vector<float> Halves(const std::vector<uint16_t>& h, Codec c) {
  std::vector<float> f(h.size());
  compress::DecodeParams(c, h.data(), h.size(), f.data());
  return f;
}

// One optimizer and codec: `steps` updates by the CPU rule and by `run` (the twin, or a GPU),
// compared after each.
struct Trial {
  OptimizerConfig opt;
  Codec codec;
  float weight;
  bool extra;
  Codec publish;
};

using UpdateFn = std::function<void(int opt, int codec, const gpu::UpdateArgs&)>;

void CompareWithCpuRule(const Trial& t, const UpdateFn& run) {
  std::mt19937 rng(7 + static_cast<int>(t.codec) * 31 + static_cast<int>(t.opt.kind));
  std::vector<float> cpu_p = Random(&rng, kN), twin_p = cpu_p;
  auto cpu = server::MakeCpuUpdateRule(t.opt, kN, nullptr, 0);
  OptimizerState st;
  server::InitOptimizerState(t.opt, kN, &st);
  std::vector<float> m = st.m, v = st.v;
  std::vector<uint16_t> cpu_pub(kN), twin_pub(kN);
  for (uint64_t step = 1; step <= 3; ++step) {
    auto bytes = Encoded(t.codec, Random(&rng, kN, 0.5f));
    std::vector<float> extra = Random(&rng, kN, 0.25f);
    GradientView g = View(t.codec, bytes, t.weight);
    GradientView e;
    e.data = extra.data();
    e.numel = kN;
    e.bytes = kN * 4;
    server::Publish pub{cpu_pub.data(), t.publish};
    const float scale = 0.5f;
    const float lr = 0.05f * static_cast<float>(step);
    bool done = false;
    cpu->Apply(cpu_p.data(), cpu_p.data(), g, t.extra ? &e : nullptr, scale, lr,
               t.publish == Codec::kNone ? nullptr : &pub, [&](Status s) {
                 EXPECT_TRUE(s.ok());
                 done = true;
               });
    ASSERT_TRUE(done);
    gpu::UpdateArgs a;
    a.params = twin_p.data();
    a.m = m.empty() ? nullptr : m.data();
    a.v = v.empty() ? nullptr : v.data();
    a.grad = EncodedOf(g);
    a.extra = t.extra ? extra.data() : nullptr;
    a.publish = t.publish == Codec::kNone ? nullptr : twin_pub.data();
    a.publish_codec = static_cast<int>(t.publish);
    a.numel = kN;
    a.k = server::MakeStepParams(t.opt, scale, step, lr);
    run(static_cast<int>(t.opt.kind), static_cast<int>(t.codec), a);
    ExpectSame(cpu_p, twin_p, "parameters");
    if (t.publish != Codec::kNone)
      ExpectSame(Halves(cpu_pub, t.publish), Halves(twin_pub, t.publish), "published");
  }
}

std::vector<Trial> AllTrials() {
  std::vector<Trial> out;
  for (const auto& c : Optimizers())
    for (Codec codec : kCodecs)
      for (float w : {1.0f, 0.5f})
        for (bool extra : {false, true})
          for (Codec pub : {Codec::kNone, Codec::kFp16, Codec::kBf16})
            out.push_back({c.opt, codec, w, extra, pub});
  return out;
}

std::string Describe(const Trial& t) {
  return std::string("optimizer ") + std::to_string(static_cast<int>(t.opt.kind)) +
         (t.opt.nesterov ? " nesterov" : "") + " codec " + CodecName(t.codec) + " weight " +
         std::to_string(t.weight) + (t.extra ? " extra" : "") + " publish " + CodecName(t.publish);
}

TEST(FusedUpdate, TwinMatchesTheCpuRuleForEveryCodecAndOptimizer) {
  int trials = 0;
  for (const Trial& t : AllTrials()) {
    SCOPED_TRACE(Describe(t));
    CompareWithCpuRule(t,
                       [](int o, int c, const gpu::UpdateArgs& a) { gpu::UpdateOnHost(o, c, a); });
    if (HasFatalFailure()) return;
    ++trials;
  }
  EXPECT_EQ(trials, 5 * 6 * 2 * 2 * 3);
}

TEST(FusedUpdate, TwinFoldMatchesTheCpuRuleForEveryCodec) {
  OptimizerConfig o;
  auto cpu = server::MakeCpuUpdateRule(o, kN, nullptr, 0);
  std::mt19937 rng(3);
  for (Codec codec : kCodecs) {
    for (float w : {1.0f, 0.5f}) {
      SCOPED_TRACE(std::string(CodecName(codec)) + " weight " + std::to_string(w));
      std::vector<float> want(kN), got(kN);
      for (bool first : {true, false}) {
        auto bytes = Encoded(codec, Random(&rng, kN));
        GradientView g = View(codec, bytes, w);
        cpu->Fold(want.data(), g, first);
        gpu::FoldArgs a;
        a.dst = got.data();
        a.grad = EncodedOf(g);
        a.numel = kN;
        a.first = first;
        gpu::FoldOnHost(static_cast<int>(codec), a);
        ExpectSame(want, got, first ? "first fold" : "second fold");
      }
    }
  }
}

TEST(Device, ParsesTheDeviceOption) {
  gpu::DeviceSpec d;
  ASSERT_TRUE(gpu::ParseDevice("cpu", &d).ok());
  EXPECT_EQ(d.gpu, -1);
  EXPECT_FALSE(d.twin);
  ASSERT_TRUE(gpu::ParseDevice("cuda", &d).ok());
  EXPECT_EQ(d.gpu, 0);
  ASSERT_TRUE(gpu::ParseDevice("cuda:3", &d).ok());
  EXPECT_EQ(d.gpu, 3);
  ASSERT_TRUE(gpu::ParseDevice("twin", &d).ok());
  EXPECT_TRUE(d.twin);
  EXPECT_EQ(d.twin_bytes, 0u);
  ASSERT_TRUE(gpu::ParseDevice("twin:64MiB", &d).ok());
  EXPECT_EQ(d.twin_bytes, 64u << 20);
  ASSERT_TRUE(gpu::ParseDevice("twin:4096", &d).ok());
  EXPECT_EQ(d.twin_bytes, 4096u);
  for (const char* bad : {"gpu", "cuda:", "cuda:x", "cuda:-1", "cuda:123456", "cuda:1MiB", "CUDA",
                          "", "twin:", "twin:0", "twin:12TiB", "twin:MiB"}) {
    Status s = gpu::ParseDevice(bad, &d);
    EXPECT_TRUE(s.IsInvalidArgument()) << bad;
    EXPECT_NE(s.message().find("expected cpu, cuda, cuda:N"), std::string::npos) << s.ToString();
  }
}

TEST(Device, TwinOfAGivenSizeRunsOutOfMemoryAsAGpuWould) {
  auto d = gpu::MakeTwinDevice(1, 1 << 20);
  auto a = d->Alloc(600 << 10);
  ASSERT_TRUE(a.ok());
  EXPECT_EQ(*d->FreeBytes(), (1u << 20) - (600u << 10));
  auto b = d->Alloc(600 << 10);
  EXPECT_EQ(b.status().code(), Status::Code::kResourceExhausted) << b.status().ToString();
  d->Free(*a);
  EXPECT_EQ(*d->FreeBytes(), 1u << 20);
}

TEST(Device, CudaIsRefusedWithTheReasonWhereThereIsNone) {
  auto d = gpu::OpenCudaDevice(0, 2);
  if (d.ok()) GTEST_SKIP() << "a GPU is present: " << (*d)->name();
  EXPECT_TRUE(d.status().IsNotFound()) << d.status().ToString();
  EXPECT_FALSE(d.status().message().empty());
}

// The devices to run the device rule on: the twin, and GPU 0 where there is one.
std::vector<std::shared_ptr<gpu::Device>> Devices() {
  std::vector<std::shared_ptr<gpu::Device>> out{gpu::MakeTwinDevice(2)};
  if (auto d = gpu::OpenCudaDevice(0, 2); d.ok()) out.push_back(*d);
  return out;
}

// Runs what the engine hands to its owner on the test's thread.
class Owner {
 public:
  void Post(std::function<void()> fn) {
    std::lock_guard<std::mutex> lock(mu_);
    q_.push_back(std::move(fn));
    cv_.notify_all();
  }
  // Runs posted work until `done` holds: false after 10 s.
  bool RunUntil(const std::function<bool()>& done) {
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    std::unique_lock<std::mutex> lock(mu_);
    while (!done()) {
      if (q_.empty() && !cv_.wait_until(lock, deadline, [&] { return !q_.empty(); })) return false;
      auto fn = std::move(q_.front());
      q_.pop_front();
      lock.unlock();
      fn();
      lock.lock();
    }
    return true;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> q_;
};

// A chunk of kN elements on the device rule, with its slots in host memory.
struct DeviceChunk {
  DeviceChunk(std::shared_ptr<gpu::Device> device, server::EngineConfig ec, OptimizerConfig opt,
              Codec pull, const std::vector<float>& init)
      : layout(cluster::LayoutFor(kN, pull)), slots(layout.stride * 2 / 8 + 1) {
    compress::EncodeParams(pull, init.data(), 0, kN, slots.data());
    auto rule = server::MakeDeviceUpdateRule(device, 1, opt, kN, init.data(), kN * 4, slots.data(),
                                             slots.size() * 8, "test chunk");
    EXPECT_TRUE(rule.ok()) << rule.status().ToString();
    engine = std::make_unique<server::ChunkEngine>(
        ec, std::move(rule).value(),
        server::SlotMemory{reinterpret_cast<uint8_t*>(slots.data()), layout, pull},
        [this](std::function<void()> fn) { owner.Post(std::move(fn)); },
        [this](server::EngineActions a) { Take(std::move(a)); });
  }

  void Take(server::EngineActions a) {
    for (auto& ack : a.acks) {
      EXPECT_TRUE(ack.status.ok()) << ack.status.ToString();
      acks.push_back(ack.version);
    }
  }

  // A push of `bytes` (encoded with `codec`) by `worker`, step `seq`.
  void Push(uint32_t worker, uint64_t seq, Codec codec, std::vector<uint8_t> bytes) {
    held.push_back(std::move(bytes));
    server::LandedPush p;
    p.worker = worker;
    p.seq = seq;
    p.buffer = server::kNoLandingBuffer;
    p.grad = View(codec, held.back(), 1.0f);
    p.reply.request = seq * 100 + worker;
    Take(engine->OnPush(std::move(p)));
  }
  bool WaitVersion(uint64_t v) {
    return owner.RunUntil([&] { return engine->version() >= v; });
  }
  std::vector<float> Params(Codec pull) const {
    uint64_t v = engine->version();
    const auto* slot = reinterpret_cast<const uint8_t*>(slots.data()) + (v % 2) * layout.stride;
    std::vector<float> out(kN);
    compress::DecodeParams(pull, slot, kN, out.data());
    return out;
  }

  Owner owner;
  cluster::SlotLayout layout;
  std::vector<uint64_t> slots;
  std::deque<std::vector<uint8_t>> held;
  std::vector<uint64_t> acks;
  std::unique_ptr<server::ChunkEngine> engine;
};

std::vector<uint8_t> Ints(float base) {
  std::vector<float> g(kN);
  for (uint64_t i = 0; i < kN; ++i) g[i] = base + static_cast<float>(i % 7);
  return Encoded(Codec::kNone, g);
}

TEST(DeviceRule, SyncSumsEveryWorkersPushExactly) {
  for (auto& device : Devices()) {
    SCOPED_TRACE(device->name());
    server::EngineConfig ec;
    ec.mode = Mode::kSync;
    ec.num_workers = 3;
    ec.aggregate = Aggregate::kSum;
    OptimizerConfig sgd;
    sgd.lr = 1.0f;
    DeviceChunk c(device, ec, sgd, Codec::kNone, std::vector<float>(kN, 1000.0f));
    for (uint64_t step = 1; step <= 4; ++step)
      for (uint32_t w = 0; w < 3; ++w) c.Push(w, step, Codec::kNone, Ints(static_cast<float>(w)));
    ASSERT_TRUE(c.WaitVersion(4));
    ASSERT_TRUE(c.owner.RunUntil([&] { return c.acks.size() == 12; }));
    // Each step: 3 * (i % 7) + 0 + 1 + 2.
    std::vector<float> want(kN);
    for (uint64_t i = 0; i < kN; ++i) want[i] = 1000.0f - 4.0f * (3.0f * (i % 7) + 3.0f);
    ExpectSame(want, c.Params(Codec::kNone), "parameters");
    std::vector<uint64_t> versions = c.acks;
    std::sort(versions.begin(), versions.end());
    EXPECT_EQ(versions, (std::vector<uint64_t>{1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4}));
  }
}

TEST(DeviceRule, AsyncAppliesEachPushOnceWithTopK) {
  for (auto& device : Devices()) {
    SCOPED_TRACE(device->name());
    server::EngineConfig ec;
    ec.mode = Mode::kAsync;
    ec.num_workers = 2;
    OptimizerConfig sgd;
    sgd.lr = 1.0f;
    DeviceChunk c(device, ec, sgd, Codec::kNone, std::vector<float>(kN, 0.0f));
    // topk of a gradient whose largest elements are known: every 10th element is 10 + w.
    for (uint64_t step = 1; step <= 3; ++step) {
      for (uint32_t w = 0; w < 2; ++w) {
        std::vector<float> g(kN, 0.0f);
        for (uint64_t i = 0; i < kN; i += 10) g[i] = 10.0f + static_cast<float>(w);
        c.Push(w, step, Codec::kTopK, Encoded(Codec::kTopK, g));
      }
    }
    ASSERT_TRUE(c.WaitVersion(6));
    ASSERT_TRUE(c.owner.RunUntil([&] { return c.acks.size() == 6; }));
    std::vector<float> want(kN, 0.0f);
    for (uint64_t i = 0; i < kN; i += 10) want[i] = -3.0f * 21.0f;
    ExpectSame(want, c.Params(Codec::kNone), "parameters");
  }
}

// The device rule through the engine against the CPU rule through the engine: sync of 2 workers,
// adam, int8 pushes, fp16 pulls; the published slots agree bit for bit.
TEST(DeviceRule, MatchesTheCpuRuleThroughTheEngine) {
  for (auto& device : Devices()) {
    SCOPED_TRACE(device->name());
    server::EngineConfig ec;
    ec.mode = Mode::kSync;
    ec.num_workers = 2;
    ec.aggregate = Aggregate::kMean;
    OptimizerConfig adam;
    adam.kind = OptimizerKind::kAdam;
    adam.lr = 0.01f;
    std::mt19937 rng(11);
    std::vector<float> init = Random(&rng, kN);
    DeviceChunk d(device, ec, adam, Codec::kFp16, init);
    // The CPU chunk: fp16 slots with an fp32 master, as the server makes it.
    cluster::SlotLayout layout = cluster::LayoutFor(kN, Codec::kFp16);
    std::vector<uint64_t> slots(layout.stride * 2 / 8 + 1);
    std::vector<float> master = init;
    compress::EncodeParams(Codec::kFp16, master.data(), 0, kN, slots.data());
    server::ChunkEngine cpu(ec, server::MakeCpuUpdateRule(adam, kN, nullptr, 0),
                            server::SlotMemory{reinterpret_cast<uint8_t*>(slots.data()), layout,
                                               Codec::kFp16, master.data()});
    std::deque<std::vector<uint8_t>> held;
    for (uint64_t step = 1; step <= 3; ++step) {
      for (uint32_t w = 0; w < 2; ++w) {
        auto bytes = Encoded(Codec::kInt8, Random(&rng, kN));
        held.push_back(bytes);
        server::LandedPush p;
        p.worker = w;
        p.seq = step;
        p.buffer = server::kNoLandingBuffer;
        p.grad = View(Codec::kInt8, held.back(), 1.0f);
        cpu.OnPush(std::move(p));
        d.Push(w, step, Codec::kInt8, bytes);
      }
    }
    ASSERT_TRUE(d.WaitVersion(3));
    ASSERT_EQ(cpu.version(), 3u);
    const auto* want = reinterpret_cast<const uint8_t*>(slots.data()) + layout.stride;
    const auto* got = reinterpret_cast<const uint8_t*>(d.slots.data()) + d.layout.stride;
    EXPECT_EQ(std::memcmp(want, got, layout.data_bytes), 0);
  }
}

// The kernels against the CPU rule (which the twin matches), on a GPU: identical values. The
// kernels are built with -fmad=false and the default IEEE division and square root without flushing
// subnormals, the twin without FMA contraction, so the bound is 0 for every codec and optimizer;
// NaN never passes.
TEST(FusedUpdateGpu, KernelsMatchTheTwinForEveryCodecAndOptimizer) {
  auto opened = gpu::OpenCudaDevice(0, 1);
  if (!opened.ok()) GTEST_SKIP() << opened.status().ToString();
  auto dev = *opened;
  auto upload = [&](const void* src, size_t bytes) {
    void* p = dev->Alloc(bytes < 4 ? 4 : bytes).value();
    EXPECT_TRUE(dev->Copy(p, src, bytes, 0).ok());
    return p;
  };
  for (const Trial& t : AllTrials()) {
    SCOPED_TRACE(Describe(t));
    CompareWithCpuRule(t, [&](int o, int c, const gpu::UpdateArgs& a) {
      const size_t n = a.numel * 4;
      const size_t gbytes = t.codec == Codec::kTopK
                                ? compress::TopKBytes(gpu::TopKCount(a.grad))
                                : compress::EncodedBytes({t.codec, 256, 0}, a.numel);
      gpu::UpdateArgs d = a;
      d.params = static_cast<float*>(upload(a.params, n));
      d.m = a.m ? static_cast<float*>(upload(a.m, n)) : nullptr;
      d.v = a.v ? static_cast<float*>(upload(a.v, n)) : nullptr;
      d.grad.data = static_cast<const uint8_t*>(upload(a.grad.data, gbytes));
      d.extra = a.extra ? static_cast<const float*>(upload(a.extra, n)) : nullptr;
      d.publish = a.publish ? upload(a.publish, a.numel * 2) : nullptr;
      ASSERT_TRUE(dev->Update(o, c, d, 0).ok());
      ASSERT_TRUE(dev->Copy(a.params, d.params, n, 0).ok());
      if (a.m) {
        ASSERT_TRUE(dev->Copy(a.m, d.m, n, 0).ok());
      }
      if (a.v) {
        ASSERT_TRUE(dev->Copy(a.v, d.v, n, 0).ok());
      }
      if (a.publish) {
        ASSERT_TRUE(dev->Copy(a.publish, d.publish, a.numel * 2, 0).ok());
      }
      ASSERT_TRUE(dev->Wait(0, 10s).ok());
      const void* all[] = {d.params, d.m, d.v, d.grad.data, d.extra, d.publish};
      for (const void* p : all)
        if (p) dev->Free(const_cast<void*>(p));
    });
    if (HasFatalFailure()) return;
  }
}

// The first element where two arrays differ in their bits, or -1.
int64_t FirstDifference(const void* a, const void* b, size_t elems, size_t elem_bytes) {
  const auto* x = static_cast<const uint8_t*>(a);
  const auto* y = static_cast<const uint8_t*>(b);
  if (std::memcmp(x, y, elems * elem_bytes) == 0) return -1;
  for (size_t i = 0; i < elems; ++i)
    if (std::memcmp(x + i * elem_bytes, y + i * elem_bytes, elem_bytes) != 0)
      return static_cast<int64_t>(i);
  return -1;
}

// Chunks far larger than one launch's threads on a GPU against the twin: the grid-stride loops
// go round several times (more than 8 blocks of 256 threads per multiprocessor) and topk spans
// thousands of tiles. Every codec with Adam (both state arrays) and a running sum, publishing
// fp16 into memory poisoned with NaN, and every codec's fold into NaN: bit for bit the twin's,
// every element written.
TEST(FusedUpdateGpu, LargeChunksMatchTheTwinAndEveryElementIsWritten) {
  auto opened = gpu::OpenCudaDevice(0, 1);
  if (!opened.ok()) GTEST_SKIP() << opened.status().ToString();
  auto dev = *opened;
  constexpr uint64_t n = (3u << 20) + 13;
  std::vector<void*> owned;
  auto upload = [&](const void* src, size_t bytes) {
    auto p = dev->Alloc(bytes);
    EXPECT_TRUE(p.ok()) << p.status().ToString();
    owned.push_back(*p);
    EXPECT_TRUE(dev->Copy(*p, src, bytes, 0).ok());
    return *p;
  };
  auto download = [&](void* dst, const void* src, size_t bytes) {
    ASSERT_TRUE(dev->Copy(dst, src, bytes, 0).ok());
    ASSERT_TRUE(dev->Wait(0, 30s).ok());
  };
  OptimizerConfig adam;
  adam.kind = OptimizerKind::kAdam;
  adam.lr = 0.01f;
  adam.weight_decay = 0.01f;
  std::mt19937 rng(17);
  for (Codec codec : kCodecs) {
    SCOPED_TRACE(CodecName(codec));
    compress::ChunkCodec cc{codec, 256, codec == Codec::kTopK ? n / 100 : 0};
    std::vector<float> raw = Random(&rng, n);
    std::vector<uint8_t> enc(compress::EncodedBytes(cc, n));
    compress::Encode(cc, raw.data(), n, enc.data(), nullptr);
    std::vector<float> params = Random(&rng, n), m = Random(&rng, n, 0.1f), v(n),
                       extra = Random(&rng, n, 0.25f);
    for (auto& x : v) x = std::abs(Random(&rng, 1, 0.1f)[0]);
    std::vector<uint16_t> publish(n, 0xffff);  // NaN as fp16

    gpu::UpdateArgs d;
    d.params = static_cast<float*>(upload(params.data(), n * 4));
    d.m = static_cast<float*>(upload(m.data(), n * 4));
    d.v = static_cast<float*>(upload(v.data(), n * 4));
    d.grad = {static_cast<const uint8_t*>(upload(enc.data(), enc.size())), n, 256, 0.5f};
    d.extra = static_cast<const float*>(upload(extra.data(), n * 4));
    d.publish = upload(publish.data(), n * 2);
    d.publish_codec = static_cast<int>(Codec::kFp16);
    d.numel = n;
    d.k = server::MakeStepParams(adam, 0.5f, 3, std::nullopt);
    gpu::UpdateArgs h = d;
    h.params = params.data();
    h.m = m.data();
    h.v = v.data();
    h.grad.data = enc.data();
    h.extra = extra.data();
    h.publish = publish.data();
    // The host arrays change below: the uploads (asynchronous) complete first.
    ASSERT_TRUE(dev->Wait(0, 30s).ok());
    ASSERT_TRUE(dev->Update(static_cast<int>(adam.kind), static_cast<int>(codec), d, 0).ok());
    gpu::UpdateOnHost(static_cast<int>(adam.kind), static_cast<int>(codec), h);
    std::vector<float> got(n);
    std::vector<uint16_t> got_pub(n);
    const std::pair<const char*, std::pair<const float*, const float*>> arrays[] = {
        {"parameters", {d.params, params.data()}}, {"m", {d.m, m.data()}}, {"v", {d.v, v.data()}}};
    for (const auto& [what, ptrs] : arrays) {
      download(got.data(), ptrs.first, n * 4);
      EXPECT_EQ(FirstDifference(got.data(), ptrs.second, n, 4), -1) << what;
    }
    download(got_pub.data(), d.publish, n * 2);
    EXPECT_EQ(FirstDifference(got_pub.data(), publish.data(), n, 2), -1) << "published";
    for (uint16_t x : publish) ASSERT_NE(x, 0xffff) << "an element was not published";

    // The fold: the first into NaN, the second onto it.
    std::vector<float> sum(n, std::numeric_limits<float>::quiet_NaN());
    gpu::FoldArgs f;
    f.dst = static_cast<float*>(upload(sum.data(), n * 4));
    f.grad = d.grad;
    f.numel = n;
    ASSERT_TRUE(dev->Wait(0, 30s).ok());
    gpu::FoldArgs fh = f;
    fh.dst = sum.data();
    fh.grad.data = enc.data();
    for (bool first : {true, false}) {
      f.first = fh.first = first;
      ASSERT_TRUE(dev->Fold(static_cast<int>(codec), f, 0).ok());
      gpu::FoldOnHost(static_cast<int>(codec), fh);
    }
    download(got.data(), f.dst, n * 4);
    EXPECT_EQ(FirstDifference(got.data(), sum.data(), n, 4), -1) << "fold";
    for (float x : got) ASSERT_FALSE(std::isnan(x)) << "a folded element was not written";
    ASSERT_TRUE(dev->Wait(0, 30s).ok());
    for (void* p : owned) dev->Free(p);
    owned.clear();
    if (HasFailure()) return;
  }
}

}  // namespace
}  // namespace shardps
