// Node-level reduction (docs/node-reduction.md): the shared-memory reducer on its own, and
// whole jobs whose workers sum on their node before they push.
#include <atomic>
#include <nlohmann/json.hpp>
#include <thread>

#include "cluster/messages.h"
#include "core/codec.h"
#include "support/exact_values.h"
#include "support/local_cluster.h"
#include "worker/node_reducer.h"

namespace shardps {
namespace {

using namespace std::chrono_literals;
using testing::LocalCluster;
using worker::NodeOpKind;

using testing::Grad;
using testing::Opts;
using testing::Sgd1;

// Workers 2n and 2n+1 are node n.
std::function<void(WorkerOptions&)> Nodes(uint32_t per_node,
                                          std::chrono::milliseconds timeout = 20000ms) {
  return [per_node, timeout](WorkerOptions& o) {
    o.local_size = per_node;
    o.local_rank = o.rank % static_cast<int32_t>(per_node);
    o.node = "node" + std::to_string(o.rank / static_cast<int32_t>(per_node));
    o.rpc_timeout = timeout;
  };
}

TEST(SplitChunks, BalancesBytesTheSameWayEverywhere) {
  std::vector<uint64_t> load(3, 0);
  EXPECT_EQ(worker::SplitChunks({10, 10, 10, 5, 5, 5, 30}, &load),
            (std::vector<uint32_t>{0, 1, 2, 0, 1, 2, 0}));
  EXPECT_EQ(load, (std::vector<uint64_t>{45, 15, 15}));
  // A later declaration goes on from the load so far.
  EXPECT_EQ(worker::SplitChunks({20}, &load), (std::vector<uint32_t>{1}));
}

// K reducers of one node in threads: every owner sums its ranges in local-rank order, the
// gathered buffer goes out to everyone, and the next operation waits for the last to finish.
TEST(ShmNodeReducer, SumsEachOwnersRangesAndGathers) {
  constexpr uint32_t K = 3;
  constexpr uint64_t n = 1000;
  const uint64_t job = 0x1234567800000000ull + static_cast<uint64_t>(getpid());
  std::vector<std::unique_ptr<worker::NodeReducer>> rs(K);
  std::vector<std::thread> ts;
  for (uint32_t k = 0; k < K; ++k)
    ts.emplace_back([&, k] {
      auto r = worker::CreateShmNodeReducer(job, 7, k, K, 10000ms);
      ASSERT_TRUE(r.ok()) << r.status().ToString();
      rs[k] = std::move(r).value();
      ASSERT_TRUE(rs[k]->AddTensors(0, {worker::NodeTensor{n, {}}}, 1, 10000ms).ok());
    });
  for (auto& t : ts) t.join();
  ts.clear();
  for (auto& r : rs) ASSERT_TRUE(r);
  // Owner k holds [k*n/K, (k+1)*n/K).
  auto range = [&](uint32_t k) {
    return std::pair<uint64_t, uint64_t>{k * n / K, (k + 1) * n / K};
  };
  for (uint64_t seq = 1; seq <= 3; ++seq) {
    for (uint32_t k = 0; k < K; ++k)
      ts.emplace_back([&, k, seq] {
        auto& r = *rs[k];
        auto deadline = std::chrono::steady_clock::now() + 10s;
        auto until = [&](auto ready) {
          while (!ready()) {
            ASSERT_LT(std::chrono::steady_clock::now(), deadline);
            r.WaitBell(r.Bell(), 1000us);
          }
        };
        until([&] { return r.Free(0, seq); });
        std::vector<float> g(n);
        for (uint64_t i = 0; i < n; ++i) g[i] = Grad(k, seq, i);
        ASSERT_TRUE(r.Contribute(0, seq, NodeOpKind::kPushPull, g.data()).ok());
        const float* sum = nullptr;
        auto mine = range(k);
        until([&] {
          auto s = r.Reduce(0, seq, {&mine, 1});
          EXPECT_TRUE(s.ok());
          sum = s.ok() ? *s : nullptr;
          return sum != nullptr;
        });
        // The "pull": the sum plus the step, into the gathered buffer.
        for (uint64_t i = mine.first; i < mine.second; ++i)
          r.Gather(0)[i] = sum[i] + static_cast<float>(seq);
        r.ShareDone(0, seq, true, 10 * seq + k);
        std::optional<worker::NodeShares> shares;
        until([&] { return (shares = r.Shares(0, seq)).has_value(); });
        EXPECT_EQ(shares->version, 10 * seq);
        EXPECT_TRUE(shares->failed.empty());
        std::vector<float> out(n, -1.0f);
        ASSERT_TRUE(*r.Finish(0, seq, out.data()));
        for (uint64_t i = 0; i < n; ++i) {
          float expect = static_cast<float>(seq);
          for (uint32_t w = 0; w < K; ++w) expect += Grad(w, seq, i);
          ASSERT_EQ(out[i], expect) << "element " << i;
        }
      });
    for (auto& t : ts) t.join();
    ts.clear();
  }
}

// A worker of the node that started another operation: each says so, none hangs.
TEST(ShmNodeReducer, WorkersThatDisagreeOnTheOperationAreTold) {
  const uint64_t job = 0x2234567800000000ull + static_cast<uint64_t>(getpid());
  std::unique_ptr<worker::NodeReducer> a, b;
  std::thread t([&] {
    auto r = worker::CreateShmNodeReducer(job, 0, 1, 2, 10000ms);
    ASSERT_TRUE(r.ok());
    b = std::move(r).value();
    ASSERT_TRUE(b->AddTensors(0, {worker::NodeTensor{4, {}}}, 1, 10000ms).ok());
  });
  auto r = worker::CreateShmNodeReducer(job, 0, 0, 2, 10000ms);
  ASSERT_TRUE(r.ok());
  a = std::move(r).value();
  ASSERT_TRUE(a->AddTensors(0, {worker::NodeTensor{4, {}}}, 1, 10000ms).ok());
  t.join();
  ASSERT_TRUE(b);
  float g[4] = {1, 2, 3, 4};
  ASSERT_TRUE(a->Contribute(0, 1, NodeOpKind::kPush, g).ok());
  ASSERT_TRUE(b->Contribute(0, 1, NodeOpKind::kPushPull, g).ok());
  std::pair<uint64_t, uint64_t> all{0, 4};
  auto sa = a->Reduce(0, 1, {&all, 1});
  ASSERT_FALSE(sa.ok());
  EXPECT_NE(sa.status().message().find("different operations"), std::string::npos)
      << sa.status().ToString();
  EXPECT_FALSE(b->Reduce(0, 1, {&all, 1}).ok());
  // Missing names who has not reached a phase.
  EXPECT_EQ(a->Missing(0, 1, worker::NodePhase::kShareDone), (std::vector<uint32_t>{0, 1}));
  a->ShareDone(0, 1, false, UINT64_MAX);
  EXPECT_EQ(a->Missing(0, 1, worker::NodePhase::kShareDone), (std::vector<uint32_t>{1}));
}

// Creating a second node's segments under the same job and node number fails clearly.
TEST(ShmNodeReducer, AWorkerThatNeverComesIsNamedAfterTheTimeout) {
  const uint64_t job = 0x3234567800000000ull + static_cast<uint64_t>(getpid());
  auto r = worker::CreateShmNodeReducer(job, 0, 0, 2, 300ms);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsTimeout()) << r.status().ToString();
  EXPECT_NE(r.status().message().find("only 1 of the node's 2 workers"), std::string::npos)
      << r.status().ToString();
  // Nothing is left behind: a new attempt can create it again.
  std::thread t([&] {
    auto other = worker::CreateShmNodeReducer(job, 0, 1, 2, 5000ms);
    EXPECT_TRUE(other.ok()) << other.status().ToString();
  });
  auto again = worker::CreateShmNodeReducer(job, 0, 0, 2, 5000ms);
  EXPECT_TRUE(again.ok()) << again.status().ToString();
  t.join();
}

// Sums the per-node push counts of every server; checks pushers are nodes.
std::vector<int64_t> NodePushes(LocalCluster& lc, uint32_t nodes, int64_t* applied) {
  std::vector<int64_t> per(nodes, 0);
  *applied = 0;
  for (uint32_t s = 0; s < lc.servers.size(); ++s) {
    auto st = nlohmann::json::parse(*lc.workers[0]->ServerStats(s));
    EXPECT_EQ(st["pushers"], "nodes");
    EXPECT_EQ(st["workers"].size(), nodes);
    *applied += st["pushes_applied"].get<int64_t>();
    for (const auto& w : st["workers"]) per[w["rank"].get<size_t>()] += w["pushes"].get<int64_t>();
  }
  return per;
}

// 2 nodes x 2 workers: a large tensor (chunks through landing buffers) and small ones
// (batches), push_pull and push, in sync (sum and mean) and async: exact values, versions in
// sync, one push per node per chunk per step, and half the bytes pushed.
TEST(NodeReduction, TwoNodesOfTwoWorkersExactly) {
  struct Case {
    Mode mode;
    Aggregate agg;
  };
  for (Case c : {Case{Mode::kSync, Aggregate::kSum}, Case{Mode::kSync, Aggregate::kMean},
                 Case{Mode::kAsync, Aggregate::kSum}}) {
    SCOPED_TRACE(static_cast<int>(c.mode) * 10 + static_cast<int>(c.agg));
    // 4 KiB chunks: the large tensor of 5000 floats has 5.
    auto lc = LocalCluster::Start(Opts(2, 4, c.mode, c.agg, 4096), 16, "tcp", 1, nullptr, Nodes(2));
    ASSERT_TRUE(lc);
    constexpr uint64_t kSteps = 4;
    const std::vector<int64_t> sizes = {5000, 3, 700, 1};
    const float div = c.agg == Aggregate::kMean ? 4.0f : 1.0f;
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
          // Odd steps push_pull, even steps push.
          hs.push_back(s % 2 ? w.PushPull((*ids)[k], g[k].data(), out[k].data())
                             : w.Push((*ids)[k], g[k].data()));
        }
        for (size_t k = 0; k < sizes.size(); ++k) {
          ASSERT_TRUE(hs[k].Wait(60s).ok()) << hs[k].Wait(0ms).ToString();
          if (c.mode != Mode::kSync || s % 2 == 0) continue;
          // Sync: the push_pull returns exactly the parameters after step s.
          ASSERT_EQ(hs[k].version(), s);
          for (int64_t i = 0; i < sizes[k]; ++i) {
            float expect = static_cast<float>(k) * 100;
            for (uint64_t t = 1; t <= s; ++t) {
              float sum = 0;
              for (uint32_t ww = 0; ww < 4; ++ww) sum += Grad(ww, t, i);
              expect -= sum / div;
            }
            ASSERT_EQ(out[k][i], expect) << "tensor " << k << " element " << i << " step " << s;
          }
        }
      }
      ASSERT_TRUE(w.Barrier("pushed", 60s).ok());
      for (size_t k = 0; k < sizes.size(); ++k) {
        std::vector<float> out(sizes[k], -1.0f);
        auto h = w.Pull((*ids)[k], out.data());
        ASSERT_TRUE(h.Wait(60s).ok());
        // Every node pushed every step of every chunk: 2 pushes per chunk per step.
        EXPECT_EQ(h.version(), c.mode == Mode::kSync ? kSteps : 2 * kSteps);
        for (int64_t i = 0; i < sizes[k]; ++i) {
          float expect = static_cast<float>(k) * 100;
          for (uint64_t t = 1; t <= kSteps; ++t) {
            float sum = 0;
            for (uint32_t ww = 0; ww < 4; ++ww) sum += Grad(ww, t, i);
            if (c.mode == Mode::kAsync) {
              // Each node's sum is applied on its own: node 0 (workers 0, 1), node 1 (2, 3).
              expect -= Grad(0, t, i) + Grad(1, t, i);
              expect -= Grad(2, t, i) + Grad(3, t, i);
            } else {
              expect -= sum / div;
            }
          }
          ASSERT_EQ(out[i], expect) << "tensor " << k << " element " << i;
        }
      }
    });
    // 5 + 1 + 1 + 1 chunks, each pushed once per node per step.
    int64_t applied = 0;
    const auto per = NodePushes(*lc, 2, &applied);
    EXPECT_EQ(per, (std::vector<int64_t>{8 * kSteps, 8 * kSteps}));
    EXPECT_EQ(applied, 2 * 8 * static_cast<int64_t>(kSteps));
    // The node's workers split its chunks: together they push each chunk's floats once.
    uint64_t bytes = 0;
    for (auto& w : lc->workers) bytes += w->stats().bytes_pushed;
    EXPECT_EQ(bytes, 2 * kSteps * (5000 + 3 + 700 + 1) * 4);
    lc->Finish();
  }
}

// A worker of a node that stops taking part (here: it leaves without pushing) fails its node
// mates' operation with an error naming it, after the timeout, instead of a hang.
TEST(NodeReduction, AWorkerThatDoesNotComeFailsItsNodesStepClearly) {
  auto lc = LocalCluster::Start(Opts(1, 2, Mode::kSync, Aggregate::kSum), 16, "tcp", 1, nullptr,
                                Nodes(2, 1500ms));
  ASSERT_TRUE(lc);
  std::vector<float> g(10, 1.0f), out(10);
  TensorId id = 0;
  lc->ForEachWorker([&](Worker& w) {
    auto r = w.Declare(Sgd1("x", 10, 0.0f));
    ASSERT_TRUE(r.ok()) << r.status().ToString();
    if (w.rank() == 0) id = *r;
  });
  const auto start = std::chrono::steady_clock::now();
  auto h = lc->workers[0]->PushPull(id, g.data(), out.data());
  Status st = h.Wait(30s);
  EXPECT_LT(std::chrono::steady_clock::now() - start, 15s);
  ASSERT_TRUE(st.IsTimeout()) << st.ToString();
  EXPECT_NE(st.message().find("local rank(s) 1 of node 0 did not hand in their gradient"),
            std::string::npos)
      << st.ToString();
  // Worker 0 gave that operation up: worker 1's comes to it and is told, without waiting.
  auto late = lc->workers[1]->PushPull(id, g.data(), out.data());
  st = late.Wait(10s);
  ASSERT_TRUE(st.IsAborted()) << st.ToString();
  EXPECT_NE(st.message().find("local rank 0 of node 0 gave operation 1 of the tensor up"),
            std::string::npos)
      << st.ToString();
  // The next operation starts clean: both push 1s, the node pushes 2 to step 1.
  lc->ForEachWorker([&](Worker& w) {
    std::vector<float> mine(10, -1.0f);
    auto h = w.PushPull(id, g.data(), mine.data());
    ASSERT_TRUE(h.Wait(20s).ok()) << h.Wait(0ms).ToString();
    EXPECT_EQ(h.version(), 1u);
    for (float v : mine) EXPECT_EQ(v, -2.0f);
  });
  lc->Finish();
}

// A learning rate set after a push does not reach that push, although the node thread starts
// the push's share later.
TEST(NodeReduction, ARateSetAfterAPushTakesEffectAtTheNextPush) {
  auto lc = LocalCluster::Start(Opts(1, 2, Mode::kSync, Aggregate::kSum), 16, "tcp", 1, nullptr,
                                Nodes(2));
  ASSERT_TRUE(lc);
  lc->ForEachWorker([&](Worker& w) {
    auto id = w.Declare(Sgd1("x", 300, 0.0f));
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    std::vector<float> g(300, 1.0f), out(300, 7.0f);
    for (int round = 0; round < 20; ++round) {
      ASSERT_TRUE(w.SetLearningRate(*id, 1.0f).ok());
      Handle a = w.Push(*id, g.data());
      ASSERT_TRUE(w.SetLearningRate(*id, 0.5f).ok());
      Handle b = w.Push(*id, g.data());
      ASSERT_TRUE(a.Wait(20s).ok());
      ASSERT_TRUE(b.Wait(20s).ok());
    }
    ASSERT_TRUE(w.Pull(*id, out.data()).Wait(20s).ok());
    // Each round: the node's sum 2 at rate 1, then 2 at rate 0.5.
    for (float v : out) ASSERT_EQ(v, -60.0f);
  });
  lc->Finish();
}

// Workers of a node that declare the same sizes under other names, or in another order, are
// told at Declare, not left to sum unrelated tensors.
TEST(NodeReduction, DeclarationsThatDifferOnANodeAreRefused) {
  auto lc = LocalCluster::Start(Opts(1, 2, Mode::kSync, Aggregate::kSum), 16, "tcp", 1, nullptr,
                                Nodes(2, 1500ms));
  ASSERT_TRUE(lc);
  std::vector<Status> got(2);
  lc->ForEachWorker([&](Worker& w) {
    std::vector<TensorSpec> specs = {Sgd1("a", 8, 0.0f), Sgd1("b", 8, 0.0f)};
    if (w.rank() == 1) std::swap(specs[0], specs[1]);
    got[w.rank()] = w.Declare(specs).status();
  });
  for (const Status& st : got) EXPECT_FALSE(st.ok());
  EXPECT_NE(got[1].message().find("declared different tensors"), std::string::npos)
      << got[1].ToString();
  lc->Finish();
}

// Mismatched declarations of what a node is are refused when the job forms, with the reason.
TEST(NodeReduction, NodesThatDoNotAddUpAreRefused) {
  {
    // Three workers on one node that says it has two.
    CoordinatorOptions co = Opts(1, 3, Mode::kSync, Aggregate::kSum);
    co.register_timeout = 20s;
    auto c = Coordinator::Start(co);
    ASSERT_TRUE(c.ok());
    std::vector<std::thread> ts;
    std::vector<Status> got(3);
    std::thread srv([&] {
      ServerOptions so;
      so.coordinator = (*c)->address();
      so.register_timeout = 20s;
      auto s = Server::Start(so);
      EXPECT_FALSE(s.ok());
    });
    for (int i = 0; i < 3; ++i)
      ts.emplace_back([&, i] {
        WorkerOptions wo;
        wo.coordinator = (*c)->address();
        wo.rank = i;
        wo.local_size = 2;
        wo.local_rank = i % 2;
        wo.node = "same";
        wo.register_timeout = 20s;
        got[i] = Worker::Connect(wo).status();
      });
    for (auto& t : ts) t.join();
    srv.join();
    for (const Status& st : got) {
      EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
      EXPECT_NE(st.message().find("local rank 0, taken"), std::string::npos) << st.ToString();
    }
  }
  {
    // A sync quorum sums pushes one by one: not with nodes.
    CoordinatorOptions co = Opts(1, 2, Mode::kSync, Aggregate::kSum);
    co.sync_quorum = 1;
    co.register_timeout = 20s;
    auto c = Coordinator::Start(co);
    ASSERT_TRUE(c.ok());
    std::thread srv([&] {
      ServerOptions so;
      so.coordinator = (*c)->address();
      so.register_timeout = 20s;
      EXPECT_FALSE(Server::Start(so).ok());
    });
    std::vector<std::thread> ts;
    std::vector<Status> got(2);
    for (int i = 0; i < 2; ++i)
      ts.emplace_back([&, i] {
        WorkerOptions wo;
        wo.coordinator = (*c)->address();
        wo.rank = i;
        wo.local_size = 2;
        wo.local_rank = i;
        wo.node = "n";
        wo.register_timeout = 20s;
        got[i] = Worker::Connect(wo).status();
      });
    for (auto& t : ts) t.join();
    srv.join();
    for (const Status& st : got)
      EXPECT_NE(st.message().find("cannot be combined with a sync quorum"), std::string::npos)
          << st.ToString();
  }
}

// The view's nodes: written and read back; counts and numbering that do not add up refused.
TEST(NodeReduction, TheViewCarriesEachWorkersNode) {
  auto decode = [](const cluster::ClusterView& v) {
    Bytes b;
    Writer w(&b);
    v.Encode(&w);
    Reader r(b.data(), b.size());
    cluster::ClusterView out;
    const bool ok = out.Decode(&r) && r.done();
    return std::make_pair(ok, out);
  };
  cluster::ClusterView v;
  v.num_workers = 4;
  v.job_id = 77;
  auto [ok0, plain] = decode(v);
  ASSERT_TRUE(ok0);
  EXPECT_EQ(plain.num_pushers(), 4u);
  EXPECT_EQ(plain.PusherOf(3), 3u);
  v.worker_nodes = {0, 0, 1, 1};
  auto [ok1, nodes] = decode(v);
  ASSERT_TRUE(ok1);
  EXPECT_EQ(nodes.worker_nodes, v.worker_nodes);
  EXPECT_EQ(nodes.job_id, 77u);
  EXPECT_EQ(nodes.num_pushers(), 2u);
  EXPECT_EQ(nodes.PusherOf(2), 1u);
  v.worker_nodes = {0, 2, 2, 0};  // node 1 has nobody
  EXPECT_FALSE(decode(v).first);
  v.worker_nodes = {0, 4, 1, 2};  // a node number past the workers
  EXPECT_FALSE(decode(v).first);
  v.worker_nodes = {0, 1};  // not one per worker
  EXPECT_FALSE(decode(v).first);
}

TEST(NodeReduction, OptionsAreChecked) {
  WorkerOptions o;
  o.coordinator = "127.0.0.1:1";
  o.local_size = 2;
  o.local_rank = 2;
  EXPECT_FALSE(o.Validate().ok());
  o.local_rank = 1;
  EXPECT_TRUE(o.Validate().ok());
  std::vector<std::string> env = {"SHARDPS_COORDINATOR=127.0.0.1:1", "SHARDPS_WORKERS_PER_NODE=4"};
  auto from = [&](std::vector<std::string> e) {
    std::vector<char*> p;
    for (auto& s : e) p.push_back(s.data());
    p.push_back(nullptr);
    return WorkerOptions::FromEnvironment(p.data());
  };
  // No local rank anywhere: said.
  auto r = from(env);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("local rank is unknown"), std::string::npos);
  // torchrun's LOCAL_RANK.
  auto e2 = env;
  e2.push_back("LOCAL_RANK=3");
  e2.push_back("LOCAL_WORLD_SIZE=4");
  e2.push_back("RANK=3");
  e2.push_back("WORLD_SIZE=4");
  e2.push_back("MASTER_ADDR=127.0.0.1");
  r = from(e2);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  EXPECT_EQ(r->local_rank, 3);
  EXPECT_EQ(r->local_size, 4u);
  // Ours wins.
  e2.push_back("SHARDPS_LOCAL_RANK=1");
  e2.push_back("SHARDPS_NODE=rack1/a");
  r = from(e2);
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->local_rank, 1);
  EXPECT_EQ(r->node, "rack1/a");
  EXPECT_FALSE(from({"SHARDPS_COORDINATOR=x:1", "SHARDPS_WORKERS_PER_NODE=0"}).ok());
}

}  // namespace
}  // namespace shardps
