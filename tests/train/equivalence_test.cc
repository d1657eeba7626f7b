// Data-parallel training through the parameter server (sync mode, mean aggregation) computes
// what one process computes with the same global batch: W workers each push the mean gradient
// of their slice, the servers average them and apply the optimizer, which equals the mean
// gradient of the whole batch up to float rounding.
#include <cmath>
#include <random>
#include <tuple>

#include <gtest/gtest.h>

#include "server/optimizer.h"
#include "support/local_cluster.h"
#include "train/mlp.h"

namespace shardps {
namespace {

using namespace std::chrono_literals;
using train::ConstPtrs;
using train::Ptrs;
using train::Tensors;

constexpr int kIn = 20, kClasses = 10, kGlobalBatch = 12, kSteps = 10;
constexpr uint64_t kSeed = 7;
const train::MlpShape kShape{{kIn, 16, kClasses}};

struct Data {
  std::vector<float> x;
  std::vector<uint8_t> y;
};

// Gaussian inputs labelled by a random linear teacher: a learnable problem.
Data MakeData(int n) {
  std::mt19937 rng(3);
  std::normal_distribution<float> g;
  std::vector<float> teacher(kIn * kClasses);
  for (float& v : teacher) v = g(rng);
  Data d{std::vector<float>(static_cast<size_t>(n) * kIn), std::vector<uint8_t>(n)};
  for (int i = 0; i < n; ++i) {
    float best = -INFINITY;
    for (int j = 0; j < kIn; ++j) d.x[i * kIn + j] = g(rng);
    for (int c = 0; c < kClasses; ++c) {
      float z = 0;
      for (int j = 0; j < kIn; ++j) z += teacher[c * kIn + j] * d.x[i * kIn + j];
      if (z > best) {
        best = z;
        d.y[i] = static_cast<uint8_t>(c);
      }
    }
  }
  return d;
}

Tensors ZerosLike(const Tensors& ts) {
  Tensors z;
  for (const auto& t : ts) z.emplace_back(t.size(), 0.0f);
  return z;
}

// ||a - b|| / ||b|| over all tensors together.
double RelativeError(const Tensors& a, const Tensors& b) {
  double diff = 0, norm = 0;
  for (size_t k = 0; k < b.size(); ++k)
    for (size_t i = 0; i < b[k].size(); ++i) {
      diff += std::pow(static_cast<double>(a[k][i]) - b[k][i], 2);
      norm += std::pow(static_cast<double>(b[k][i]), 2);
    }
  return std::sqrt(diff / norm);
}

// One process: each step applies the servers' optimizer to the mean gradient of the batch.
Tensors TrainInOneProcess(const OptimizerConfig& opt, const Data& d) {
  train::Mlp mlp(kShape);
  Tensors p = train::InitParams(kShape, kSeed), g = ZerosLike(p);
  std::vector<server::OptimizerState> state(p.size());
  for (size_t k = 0; k < p.size(); ++k) server::InitOptimizerState(opt, p[k].size(), &state[k]);
  for (int s = 0; s < kSteps; ++s) {
    const size_t off = static_cast<size_t>(s) * kGlobalBatch;
    EXPECT_TRUE(std::isfinite(mlp.ForwardBackward(ConstPtrs(p), d.x.data() + off * kIn,
                                                  d.y.data() + off, kGlobalBatch, Ptrs(g))));
    for (size_t k = 0; k < p.size(); ++k)
      server::ApplyOptimizer(opt, p[k].data(), p[k].data(), g[k].data(), nullptr, 1.0f, p[k].size(),
                             &state[k]);
  }
  return p;
}

// W workers, each on its slice of every global batch; returns rank 0's final parameters after
// checking that every worker pulled the same. With `per_node` above 1, each run of that many
// workers is a node that sums its gradients before it pushes (node-level reduction).
Tensors TrainThroughServers(const OptimizerConfig& opt, uint32_t workers, uint32_t per_node,
                            const Data& d) {
  CoordinatorOptions co;
  co.num_servers = 2;
  co.num_workers = workers;
  co.mode = Mode::kSync;
  co.aggregate = Aggregate::kMean;
  co.chunk_bytes = 256;  // the weights span several chunks on both servers
  auto lc = testing::LocalCluster::Start(co, 16, "tcp", 1, nullptr, [per_node](WorkerOptions& o) {
    if (per_node < 2) return;
    o.local_size = per_node;
    o.local_rank = o.rank % static_cast<int32_t>(per_node);
    o.node = "node" + std::to_string(o.rank / static_cast<int32_t>(per_node));
  });
  if (lc == nullptr) return {};
  std::vector<Tensors> pulled(workers);
  lc->ForEachWorker([&](Worker& w) {
    Tensors p = train::InitParams(kShape, kSeed), g = ZerosLike(p);
    const auto specs = train::ParamSpecs(kShape);
    std::vector<TensorSpec> ts;
    for (size_t k = 0; k < specs.size(); ++k) {
      TensorSpec t;
      t.name = specs[k].name;
      t.shape = {static_cast<int64_t>(specs[k].rows), static_cast<int64_t>(specs[k].cols)};
      t.init = p[k].data();
      t.optimizer = opt;
      ts.push_back(t);
    }
    auto ids = w.Declare(ts);
    ASSERT_TRUE(ids.ok()) << ids.status().ToString();
    train::Mlp mlp(kShape);
    const int b = kGlobalBatch / static_cast<int>(workers);
    for (int s = 0; s < kSteps; ++s) {
      const size_t off = static_cast<size_t>(s) * kGlobalBatch + w.rank() * b;
      ASSERT_TRUE(std::isfinite(
          mlp.ForwardBackward(ConstPtrs(p), d.x.data() + off * kIn, d.y.data() + off, b, Ptrs(g))));
      std::vector<Handle> hs;
      for (size_t k = 0; k < p.size(); ++k)
        hs.push_back(w.PushPull((*ids)[k], g[k].data(), p[k].data()));
      for (const auto& h : hs) ASSERT_TRUE(h.Wait(20s).ok());
    }
    pulled[w.rank()] = std::move(p);
  });
  lc->Finish();
  for (uint32_t r = 1; r < workers; ++r) EXPECT_EQ(pulled[r], pulled[0]) << "worker " << r;
  return pulled[0];
}

// How many workers, and how many of them share a node (1: none do).
struct Layout {
  uint32_t workers = 1;
  uint32_t per_node = 1;
};

class Equivalence : public ::testing::TestWithParam<std::tuple<OptimizerKind, Layout>> {};

std::string CaseName(const ::testing::TestParamInfo<std::tuple<OptimizerKind, Layout>>& info) {
  const Layout l = std::get<1>(info.param);
  return std::string(OptimizerName(std::get<0>(info.param))) + "_" + std::to_string(l.workers) +
         "workers" + (l.per_node > 1 ? "_" + std::to_string(l.per_node) + "pernode" : "");
}

TEST_P(Equivalence, SyncMeanEqualsOneProcessWithTheSameGlobalBatch) {
  const auto [kind, layout] = GetParam();
  const uint32_t workers = layout.workers, per_node = layout.per_node;
  OptimizerConfig opt;
  opt.kind = kind;
  opt.lr = kind == OptimizerKind::kAdam ? 0.01f : 0.05f;
  const Data d = MakeData(kGlobalBatch * kSteps);
  const Tensors ref = TrainInOneProcess(opt, d);
  const Tensors ps = TrainThroughServers(opt, workers, per_node, d);
  ASSERT_EQ(ps.size(), ref.size());
  EXPECT_LT(RelativeError(ps, ref), 1e-5);
  // ... and training did move the parameters.
  EXPECT_GT(RelativeError(ref, train::InitParams(kShape, kSeed)), 1e-3);
}

INSTANTIATE_TEST_SUITE_P(
    Train, Equivalence,
    ::testing::Combine(::testing::Values(OptimizerKind::kSgd, OptimizerKind::kMomentum,
                                         OptimizerKind::kAdam, OptimizerKind::kAdagrad),
                       ::testing::Values(Layout{2, 1}, Layout{3, 1}, Layout{4, 2})),
    CaseName);

}  // namespace
}  // namespace shardps
