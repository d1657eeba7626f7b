// Server pieces: the optimizers against a float64 reference; the push protocol spoken by hand
// over a raw transport connection (a resent push is applied once; malformed messages close
// only that connection).
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <future>
#include <limits>
#include <mutex>
#include <optional>
#include <random>
#include <thread>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <fmt/format.h>
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include "cluster/messages.h"
#include "cluster/rpc.h"
#include "server/applier.h"
#include "server/landing_pool.h"
#include "server/optimizer.h"
#include "support/local_cluster.h"
#include "transport/context.h"

namespace shardps {
namespace {

using namespace std::chrono_literals;

// The optimizers' rules in double precision, written independently of optimizer.cc.
struct Reference {
  OptimizerConfig c;
  std::vector<double> p, m, v;
  int t = 0;
  void Step(const std::vector<double>& grad, double scale) {
    ++t;
    for (size_t i = 0; i < p.size(); ++i) {
      double g = scale * grad[i] + c.weight_decay * p[i];
      switch (c.kind) {
        case OptimizerKind::kSgd:
          p[i] -= c.lr * g;
          break;
        case OptimizerKind::kMomentum:
          m[i] = c.momentum * m[i] + g;
          p[i] -= c.lr * (c.nesterov ? g + c.momentum * m[i] : m[i]);
          break;
        case OptimizerKind::kAdam: {
          m[i] = c.beta1 * m[i] + (1 - c.beta1) * g;
          v[i] = c.beta2 * v[i] + (1 - c.beta2) * g * g;
          double mh = m[i] / (1 - std::pow(c.beta1, t)), vh = v[i] / (1 - std::pow(c.beta2, t));
          p[i] -= c.lr * mh / (std::sqrt(vh) + c.eps);
          break;
        }
        case OptimizerKind::kAdagrad:
          m[i] += g * g;
          p[i] -= c.lr * g / (std::sqrt(m[i]) + c.eps);
          break;
      }
    }
  }
};

class OptimizerTest : public ::testing::TestWithParam<std::tuple<OptimizerKind, bool, bool>> {
 protected:
  static OptimizerConfig Config(OptimizerKind kind, bool nesterov) {
    OptimizerConfig c;
    c.kind = kind;
    c.lr = 0.01f;
    c.weight_decay = 0.001f;
    c.nesterov = nesterov;
    c.initial_accumulator = 0.1f;
    return c;
  }
};

TEST_P(OptimizerTest, MatchesFloat64Reference) {
  auto [kind, nesterov, two_sources] = GetParam();
  const OptimizerConfig c = Config(kind, nesterov);
  const size_t n = 1027;  // not a multiple of any vector width
  std::mt19937 rng(7);
  std::normal_distribution<float> N(0, 1);
  std::vector<float> p(n), out(n), g1(n), g2(n);
  for (auto& x : p) x = N(rng);
  Reference ref{c, std::vector<double>(p.begin(), p.end()), std::vector<double>(n, 0),
                std::vector<double>(n, 0)};
  if (kind == OptimizerKind::kAdagrad) ref.m.assign(n, c.initial_accumulator);
  server::OptimizerState st;
  server::InitOptimizerState(c, n, &st);
  for (int step = 0; step < 20; ++step) {
    for (size_t i = 0; i < n; ++i) {
      g1[i] = N(rng);
      g2[i] = N(rng);
    }
    std::vector<double> g(n);
    for (size_t i = 0; i < n; ++i) g[i] = two_sources ? double(g1[i]) + g2[i] : g1[i];
    // Alternate in-place and out-of-place updates.
    float* dst = step % 2 ? p.data() : out.data();
    server::ApplyOptimizer(c, p.data(), dst, g1.data(), two_sources ? g2.data() : nullptr, 0.5f, n,
                           &st);
    if (dst != p.data()) p = out;
    ref.Step(g, 0.5);
  }
  double num = 0, den = 0;
  for (size_t i = 0; i < n; ++i) {
    num += (p[i] - ref.p[i]) * (p[i] - ref.p[i]);
    den += ref.p[i] * ref.p[i];
    ASSERT_TRUE(std::isfinite(p[i]));
  }
  EXPECT_LT(std::sqrt(num / den), 1e-5);
}

INSTANTIATE_TEST_SUITE_P(All, OptimizerTest,
                         ::testing::Values(std::make_tuple(OptimizerKind::kSgd, false, false),
                                           std::make_tuple(OptimizerKind::kSgd, false, true),
                                           std::make_tuple(OptimizerKind::kMomentum, false, false),
                                           std::make_tuple(OptimizerKind::kMomentum, true, true),
                                           std::make_tuple(OptimizerKind::kAdam, false, false),
                                           std::make_tuple(OptimizerKind::kAdam, false, true),
                                           std::make_tuple(OptimizerKind::kAdagrad, false, false)));

// An update run as ranges, in any order (as Applier::ParallelFor runs it), is bit for bit the
// update run whole: the rules are element-wise, and the optimizer state is offset with the range.
TEST_P(OptimizerTest, RangesInAnyOrderMatchTheWholeUpdate) {
  auto [kind, nesterov, two_sources] = GetParam();
  const OptimizerConfig c = Config(kind, nesterov);
  const size_t n = 10007, grain = 1000;
  std::mt19937 rng(11);
  std::normal_distribution<float> N(0, 1);
  std::vector<float> whole(n), ranged(n), next_whole(n), next_ranged(n), g1(n), g2(n);
  for (auto& x : whole) x = N(rng);
  ranged = whole;
  server::OptimizerState sw, sr;
  server::InitOptimizerState(c, n, &sw);
  server::InitOptimizerState(c, n, &sr);
  std::vector<size_t> starts;
  for (size_t lo = 0; lo < n; lo += grain) starts.push_back(lo);
  for (int step = 0; step < 5; ++step) {
    for (size_t i = 0; i < n; ++i) {
      g1[i] = N(rng);
      g2[i] = N(rng);
    }
    const float* extra = two_sources ? g2.data() : nullptr;
    server::ApplyOptimizer(c, whole.data(), next_whole.data(), g1.data(), extra, 0.5f, n, &sw);
    server::OptimizerStep prepared(c, 0.5f, &sr);
    std::shuffle(starts.begin(), starts.end(), rng);
    for (size_t lo : starts)
      prepared.Run(ranged.data(), next_ranged.data(), g1.data(), extra, lo,
                   std::min(n, lo + grain));
    whole.swap(next_whole);
    ranged.swap(next_ranged);
    ASSERT_EQ(sw.steps, sr.steps);
    for (size_t i = 0; i < n; ++i)
      ASSERT_EQ(whole[i], ranged[i]) << "step " << step << " element " << i;
  }
}

// Runs fn as a task on the apply thread of `key` and waits (bounded) for it.
void RunOn(server::Applier& a, uint64_t key, std::function<void()> fn) {
  auto done = std::make_shared<std::promise<void>>();
  auto f = done->get_future();
  a.Post(key, [fn, done] {
    fn();
    done->set_value();
  });
  ASSERT_EQ(f.wait_for(30s), std::future_status::ready) << "apply task did not finish";
}

TEST(Applier, ParallelForRunsEveryRangeExactlyOnceWithIdleThreadsHelping) {
  for (auto poll : {0us, 200us}) {
    server::Applier a;
    a.Start(3, poll);
    const size_t n = 1000003, grain = 1000;  // 1001 ranges, the last one short
    std::vector<uint8_t> seen(n, 0);
    std::atomic<uint64_t> ranges{0};
    RunOn(a, 0, [&] {
      auto owner = std::this_thread::get_id();
      a.ParallelFor(n, grain, [&](size_t lo, size_t hi) {
        ASSERT_LT(lo, hi);
        ASSERT_LE(hi, n);
        ASSERT_LE(hi - lo, grain);
        for (size_t i = lo; i < hi; ++i) seen[i]++;
        ranges++;
        // The owner is slow: the idle threads must have taken some of the ranges.
        if (std::this_thread::get_id() == owner) std::this_thread::sleep_for(200us);
      });
    });
    for (size_t i = 0; i < n; ++i) ASSERT_EQ(seen[i], 1) << "element " << i;
    EXPECT_EQ(ranges.load(), 1001u);
    EXPECT_GT(a.ranges_helped(), 0u) << "poll " << poll.count();
    EXPECT_LE(a.ranges_helped(), 1001u);
  }
}

TEST(Applier, ConcurrentParallelForsOnDifferentThreadsBothComplete) {
  server::Applier a;
  a.Start(2, 50us);
  const size_t n = 300000;
  std::vector<uint32_t> x(n, 0), y(n, 0);
  for (int round = 0; round < 50; ++round) {
    auto px = std::make_shared<std::promise<void>>(), py = std::make_shared<std::promise<void>>();
    auto gx = px->get_future(), gy = py->get_future();
    a.Post(0, [&, px] {
      a.ParallelFor(n, 4096, [&](size_t lo, size_t hi) {
        for (size_t i = lo; i < hi; ++i) x[i]++;
      });
      px->set_value();
    });
    a.Post(1, [&, py] {
      a.ParallelFor(n, 4096, [&](size_t lo, size_t hi) {
        for (size_t i = lo; i < hi; ++i) y[i] += 2;
      });
      py->set_value();
    });
    ASSERT_EQ(gx.wait_for(30s), std::future_status::ready);
    ASSERT_EQ(gy.wait_for(30s), std::future_status::ready);
  }
  for (size_t i = 0; i < n; ++i) {
    ASSERT_EQ(x[i], 50u) << i;
    ASSERT_EQ(y[i], 100u) << i;
  }
}

TEST(Applier, OneThreadOrASmallRangeRunsInline) {
  server::Applier a;
  a.Start(1, 0us);
  std::vector<std::pair<size_t, size_t>> calls;
  RunOn(a, 7, [&] {
    a.ParallelFor(1000000, 1000, [&](size_t lo, size_t hi) { calls.push_back({lo, hi}); });
  });
  ASSERT_EQ(calls.size(), 1u);
  EXPECT_EQ(calls[0], std::make_pair(size_t{0}, size_t{1000000}));
  server::Applier b;
  b.Start(4, 0us);
  calls.clear();
  RunOn(b, 0, [&] {
    b.ParallelFor(1999, 1000, [&](size_t lo, size_t hi) { calls.push_back({lo, hi}); });
  });
  ASSERT_EQ(calls.size(), 1u);
  EXPECT_EQ(calls[0], std::make_pair(size_t{0}, size_t{1999}));
  EXPECT_EQ(b.ranges_helped(), 0u);
}

// A landing buffer leased to a forward (a push sent on to its chunk's backup from where it
// landed) goes back to the pool once both the engine released it and the lease ended, in either
// order; at most half the pool is leased; a lease that ends after the pool closed or went does
// nothing.
TEST(LandingPool, ALeasedBufferReturnsOnceBothAreDone) {
  auto ctx = transport::CreateContext("tcp", transport::ContextOptions{});
  ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
  auto pool = std::make_unique<server::LandingPool>();
  ASSERT_TRUE(pool->Init(ctx->get(), 4, 4096).ok());
  std::vector<uint32_t> granted;
  auto grant = [&](uint32_t b) { granted.push_back(b); };
  for (uint64_t c = 0; c < 4; ++c) EXPECT_FALSE(pool->Request(nullptr, c, 1, grant));
  ASSERT_EQ(granted.size(), 4u);
  const std::vector<uint32_t> b = granted;
  for (uint64_t c = 0; c < 4; ++c) ASSERT_TRUE(pool->Claim(b[c], nullptr, c, 1));
  auto lease0 = pool->Lease(b[0]);
  auto lease1 = pool->Lease(b[1]);
  ASSERT_TRUE(lease0 && lease1);
  EXPECT_FALSE(pool->Lease(b[2]));  // half the pool is leased
  EXPECT_EQ(pool->leased(), 2u);
  granted.clear();
  EXPECT_TRUE(pool->Request(nullptr, 9, 1, grant));  // waits: every buffer is in use
  pool->Release(b[0]);                               // the engine is done; the forward is not
  EXPECT_TRUE(granted.empty());
  lease0.reset();
  ASSERT_EQ(granted, std::vector<uint32_t>{b[0]});
  lease1.reset();  // the forward first, then the engine
  EXPECT_EQ(pool->in_use(), 4u);
  pool->Release(b[1]);
  EXPECT_EQ(pool->in_use(), 3u);
  EXPECT_EQ(pool->leased(), 0u);
  // A buffer not claimed (or released already) is not leased.
  EXPECT_FALSE(pool->Lease(b[1]));
  // Buffers held by parked pushes count too: one buffer is always left to circulate.
  pool->AddParked(2);
  auto one = pool->Lease(b[2]);
  EXPECT_TRUE(one);
  EXPECT_FALSE(pool->Lease(b[3]));  // 1 leased + 2 parked + this one: the whole pool
  one.reset();
  pool->AddParked(-2);
  auto late = pool->Lease(b[2]);
  ASSERT_TRUE(late);
  pool->Release(b[2]);
  pool->CloseLeases();
  late.reset();  // returns nothing: the owner is stopping
  EXPECT_EQ(pool->in_use(), 3u);
  auto orphan = pool->Lease(b[3]);
  ASSERT_TRUE(orphan);
  pool.reset();
  orphan.reset();  // after the pool is gone
}

// A hand-driven client of one server: speaks the push protocol message by message.
class RawClient {
 public:
  explicit RawClient(const std::string& address, const std::string& transport = "tcp") {
    auto ctx = transport::CreateContext(transport, transport::ContextOptions{});
    ctx_ = std::move(ctx).value();
    transport::ConnectionHandlers h;
    h.on_message = [this](const std::shared_ptr<transport::Connection>&, transport::Message m) {
      if (m.tag == cluster::kBatchAnswer) {
        std::lock_guard<std::mutex> lock(mu_);
        answers_.push_back(std::move(m));
        cv_.notify_all();
        return;
      }
      if (rpc_) rpc_->OnReply(m);
    };
    h.on_close = [this](const std::shared_ptr<transport::Connection>&, Status st) {
      std::lock_guard<std::mutex> lock(mu_);
      closed_ = true;
      if (rpc_) rpc_->FailAll(st.ok() ? Status::Aborted("closed") : st);
      cv_.notify_all();
    };
    auto c = ctx_->Connect(address, h, 5s);
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    if (!c.ok()) return;
    conn_ = *c;
    rpc_ = std::make_shared<cluster::RpcChannel>(conn_);
  }
  ~RawClient() {
    conn_.reset();
    ctx_.reset();  // fires on_close into this object: before its members go
  }
  bool connected() const { return conn_ != nullptr; }
  Result<Bytes> Call(uint32_t tag, const Bytes& body) {
    return cluster::CallSync(*rpc_, tag, body, 10s, "raw call");
  }
  void SendRaw(uint32_t tag, Bytes meta) { conn_->Send(tag, std::move(meta), {}, nullptr); }
  bool WaitClosed() {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, 10s, [&] { return closed_; });
  }
  transport::Connection& conn() { return *conn_; }

  // Sends a kBatch (request id `id`) with `payload`.
  void SendBatch(uint64_t id, const cluster::BatchRequest& b, Bytes payload) {
    Bytes meta = U64sOf(id);
    Writer w(&meta);
    b.Encode(&w);
    conn_->Send(cluster::kBatch, std::move(meta), transport::Payload::Own(std::move(payload)),
                nullptr);
  }

  // Waits (at most 10 s) until `messages` kBatchAnswer messages arrived; returns them decoded,
  // with their payloads.
  std::vector<std::pair<cluster::BatchAnswer, Bytes>> WaitAnswers(size_t messages) {
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait_for(lock, 10s, [&] { return answers_.size() >= messages; });
    std::vector<std::pair<cluster::BatchAnswer, Bytes>> out;
    for (auto& m : answers_) {
      cluster::BatchAnswer a;
      Reader r(m.meta.data(), m.meta.size());
      EXPECT_TRUE(a.Decode(&r) && r.done());
      out.emplace_back(std::move(a), Bytes(m.payload.data(), m.payload.data() + m.payload.size()));
    }
    return out;
  }

 private:
  static Bytes U64sOf(uint64_t v) {
    Bytes b;
    Writer w(&b);
    w.Put(v);
    return b;
  }

  std::unique_ptr<transport::Context> ctx_;
  std::shared_ptr<transport::Connection> conn_;
  std::shared_ptr<cluster::RpcChannel> rpc_;
  std::mutex mu_;
  std::condition_variable cv_;
  bool closed_ = false;
  std::vector<transport::Message> answers_;  // kBatchAnswer messages, guarded by mu_
};

struct Grant {
  uint32_t buffer = 0;
  uint64_t offset = 0;
  transport::RemoteKey key;
};

Grant DecodeGrant(const Bytes& b) {
  Grant g;
  Reader r(b.data(), b.size());
  EXPECT_TRUE(r.Get(&g.buffer) && r.Get(&g.offset) && g.key.Decode(&r));
  return g;
}

Bytes U64s(std::initializer_list<uint64_t> v) {
  Bytes b;
  Writer w(&b);
  for (auto x : v) w.Put(x);
  return b;
}

// A kGrant request body for the push of `seq` of `chunk` by worker 0.
Bytes GrantAsk(uint64_t chunk, uint64_t bytes, uint64_t seq = 1) {
  Bytes b;
  Writer w(&b);
  cluster::GrantRequest{.chunk_id = chunk, .bytes = bytes, .worker = 0, .seq = seq}.Encode(&w);
  return b;
}

// A kPushDone body.
Bytes PushNote(uint64_t chunk, uint32_t buffer, uint32_t worker, uint64_t seq,
               uint64_t bytes = 8 * 4, std::optional<float> lr = std::nullopt) {
  Bytes b;
  Writer w(&b);
  cluster::PushDone{
      .chunk_id = chunk, .buffer = buffer, .worker = worker, .seq = seq, .bytes = bytes, .lr = lr}
      .Encode(&w);
  return b;
}

class ServerProtocol : public ::testing::Test {
 protected:
  void SetUp() override {
    CoordinatorOptions co;
    co.num_servers = 1;
    co.num_workers = 1;
    co.mode = Mode::kAsync;
    lc_ = testing::LocalCluster::Start(co);
    ASSERT_TRUE(lc_);
    TensorSpec t;
    t.name = "p";
    t.shape = {8};
    t.init_value = 10;
    t.optimizer.lr = 1.0f;
    auto id = lc_->workers[0]->Declare(t);
    ASSERT_TRUE(id.ok()) << id.status().ToString();
    id_ = *id;
  }
  void TearDown() override {
    if (lc_) lc_->Finish();
  }
  std::unique_ptr<testing::LocalCluster> lc_;
  TensorId id_ = 0;
};

// The same push notification delivered twice (a resent frame) is applied once.
TEST_F(ServerProtocol, ResentPushIsAppliedExactlyOnce) {
  RawClient raw(lc_->servers[0]->address());
  const uint64_t chunk = 1;  // the coordinator numbers chunks from 1
  auto g = raw.Call(cluster::kGrant, GrantAsk(chunk, 8 * 4));
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  Grant grant = DecodeGrant(*g);
  std::vector<float> grad(8, 2.0f);
  std::mutex mu;
  std::condition_variable cv;
  bool written = false;
  Status wst;
  raw.conn().Write(grad.data(), 32, grant.key, grant.offset, [&](Status st) {
    std::lock_guard<std::mutex> lock(mu);
    written = true;
    wst = st;
    cv.notify_all();
  });
  {
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, 10s, [&] { return written; }));
    ASSERT_TRUE(wst.ok()) << wst.ToString();
  }
  auto a1 = raw.Call(cluster::kPushDone, PushNote(chunk, grant.buffer, 0, 1));
  ASSERT_TRUE(a1.ok()) << a1.status().ToString();
  // The resend: the buffer was released after the first, so ask for it again and resend the
  // same (worker, seq).
  auto g2 = raw.Call(cluster::kGrant, GrantAsk(chunk, 8 * 4));
  ASSERT_TRUE(g2.ok());
  Grant grant2 = DecodeGrant(*g2);
  auto a2 = raw.Call(cluster::kPushDone, PushNote(chunk, grant2.buffer, 0, 1));
  ASSERT_TRUE(a2.ok()) << a2.status().ToString();
  std::vector<float> out(8);
  ASSERT_TRUE(lc_->workers[0]->Pull(id_, out.data()).Wait(10s).ok());
  for (float v : out) EXPECT_EQ(v, 8.0f);  // 10 - 1 * 2, once
  auto stats = nlohmann::json::parse(lc_->servers[0]->stats().ToJson());
  EXPECT_EQ(stats["pushes_applied"].get<int>(), 1);
  EXPECT_EQ(stats["duplicate_pushes"].get<int>(), 1);
}

// Writes `len` bytes into a granted landing buffer and waits for the write to complete.
Status WriteGranted(RawClient& raw, const void* data, size_t len, const Grant& g) {
  std::mutex mu;
  std::condition_variable cv;
  bool done = false;
  Status result;
  raw.conn().Write(data, len, g.key, g.offset, [&](Status st) {
    std::lock_guard<std::mutex> lock(mu);
    done = true;
    result = st;
    cv.notify_all();
  });
  std::unique_lock<std::mutex> lock(mu);
  if (!cv.wait_for(lock, 10s, [&] { return done; })) return Status::Timeout("write");
  return result;
}

// Regression (async pushes of one chunk applied out of order or dropped): landing credits are
// per server, so a worker's later push of a chunk that finds a credit can be notified before
// an earlier push of the same chunk that still waited for its grant; the server took the
// earlier one (seq <= last) for a resend and dropped it. Here step 2 is notified before step
// 1: both are applied, in order, once each.
TEST_F(ServerProtocol, AsyncPushesOfOneChunkAppliedOutOfOrderOrDropped) {
  RawClient raw(lc_->servers[0]->address());
  const uint64_t chunk = 1;
  auto g1 = raw.Call(cluster::kGrant, GrantAsk(chunk, 8 * 4, 1));
  auto g2 = raw.Call(cluster::kGrant, GrantAsk(chunk, 8 * 4, 2));
  ASSERT_TRUE(g1.ok() && g2.ok());
  Grant grant1 = DecodeGrant(*g1), grant2 = DecodeGrant(*g2);
  std::vector<float> one(8, 1.0f), two(8, 2.0f);
  ASSERT_TRUE(WriteGranted(raw, one.data(), 32, grant1).ok());
  ASSERT_TRUE(WriteGranted(raw, two.data(), 32, grant2).ok());
  // Step 2 first: parked until step 1 arrives, then both are acknowledged.
  auto a2 = std::async(std::launch::async, [&] {
    return raw.Call(cluster::kPushDone, PushNote(chunk, grant2.buffer, 0, 2));
  });
  EXPECT_EQ(a2.wait_for(200ms), std::future_status::timeout) << "step 2 applied before step 1";
  auto a1 = raw.Call(cluster::kPushDone, PushNote(chunk, grant1.buffer, 0, 1));
  ASSERT_TRUE(a1.ok()) << a1.status().ToString();
  ASSERT_EQ(a2.wait_for(10s), std::future_status::ready);
  auto r2 = a2.get();
  ASSERT_TRUE(r2.ok()) << r2.status().ToString();
  cluster::PushAck ack1, ack2;
  Reader ra(a1->data(), a1->size()), rb(r2->data(), r2->size());
  ASSERT_TRUE(ack1.Decode(&ra) && ack2.Decode(&rb));
  EXPECT_EQ(ack1.version, 1u);
  EXPECT_EQ(ack2.version, 2u);
  std::vector<float> out(8);
  ASSERT_TRUE(lc_->workers[0]->Pull(id_, out.data()).Wait(10s).ok());
  for (float v : out) EXPECT_EQ(v, 7.0f);  // 10 - 1 - 2
  auto stats = nlohmann::json::parse(lc_->servers[0]->stats().ToJson());
  EXPECT_EQ(stats["pushes_applied"].get<int>(), 2);
  EXPECT_EQ(stats["duplicate_pushes"].get<int>(), 0);
}

// A push whose learning rate is negative or not finite is refused with the reason and its
// landing buffer released (the connection stays: the notification was well formed); the same
// step then pushed with a valid rate is applied at that rate.
TEST_F(ServerProtocol, APushWithABadLearningRateIsRefusedAndNothingApplied) {
  RawClient raw(lc_->servers[0]->address());
  const uint64_t chunk = 1;
  std::vector<float> two(8, 2.0f);
  for (float bad :
       {-1.0f, std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity()}) {
    auto g = raw.Call(cluster::kGrant, GrantAsk(chunk, 8 * 4, 1));
    ASSERT_TRUE(g.ok()) << g.status().ToString();
    Grant grant = DecodeGrant(*g);
    ASSERT_TRUE(WriteGranted(raw, two.data(), 32, grant).ok());
    auto a = raw.Call(cluster::kPushDone, PushNote(chunk, grant.buffer, 0, 1, 32, bad));
    ASSERT_EQ(a.status().code(), Status::Code::kInvalidArgument) << a.status().ToString();
    EXPECT_NE(a.status().message().find("learning rate"), std::string::npos)
        << a.status().ToString();
  }
  auto g = raw.Call(cluster::kGrant, GrantAsk(chunk, 8 * 4, 1));
  ASSERT_TRUE(g.ok()) << g.status().ToString();
  Grant grant = DecodeGrant(*g);
  ASSERT_TRUE(WriteGranted(raw, two.data(), 32, grant).ok());
  auto a = raw.Call(cluster::kPushDone, PushNote(chunk, grant.buffer, 0, 1, 32, 0.5f));
  ASSERT_TRUE(a.ok()) << a.status().ToString();
  std::vector<float> out(8);
  ASSERT_TRUE(lc_->workers[0]->Pull(id_, out.data()).Wait(10s).ok());
  for (float v : out) EXPECT_EQ(v, 9.0f);  // 10 - 0.5 * 2, once
  auto stats = nlohmann::json::parse(lc_->servers[0]->stats().ToJson());
  EXPECT_EQ(stats["pushes_applied"].get<int>(), 1);
}

// A batch's entries are answered in entry order, each on its own: pushes applied (async), pulls
// reading what the pushes before them published, and each refused entry (unknown chunk, wrong
// size, bad learning rate) refused alone with its reason. What completed together comes back
// in one answer, the pulled parameters in its payload. A batch from an unknown worker is
// refused entry by entry.
TEST_F(ServerProtocol, ABatchAnswersEachEntryOnItsOwn) {
  RawClient raw(lc_->servers[0]->address());
  std::vector<float> one(8, 1.0f);
  const auto* g = reinterpret_cast<const uint8_t*>(one.data());
  cluster::BatchRequest b;
  b.worker = 0;
  Bytes payload;
  auto push = [&](uint64_t seq, uint64_t bytes, bool pull, std::optional<float> lr) {
    b.entries.push_back({.chunk_id = 1,
                         .push = true,
                         .pull = pull,
                         .seq = seq,
                         .bytes = bytes,
                         .base_version = 0,
                         .lr = lr});
    payload.insert(payload.end(), g, g + bytes);
  };
  push(1, 32, true, std::nullopt);                      // 0: applied: 10 - 1 = 9, pulled
  b.entries.push_back({.chunk_id = 1, .pull = true});   // 1: pulls version 1
  b.entries.push_back({.chunk_id = 99, .pull = true});  // 2: unknown chunk
  push(2, 32, false, -1.0f);                            // 3: bad learning rate
  push(2, 16, false, std::nullopt);                     // 4: wrong size
  push(2, 32, true, 2.0f);                              // 5: applied at rate 2: 9 - 2 = 7
  raw.SendBatch(7, b, payload);
  auto answers = raw.WaitAnswers(1);
  ASSERT_EQ(answers.size(), 1u);
  const cluster::BatchAnswer& a = answers[0].first;
  const Bytes& params = answers[0].second;
  EXPECT_EQ(a.batch, 7u);
  ASSERT_EQ(a.results.size(), 6u);
  for (size_t i = 0; i < a.results.size(); ++i) EXPECT_EQ(a.results[i].entry, i);
  EXPECT_TRUE(a.results[0].status.ok()) << a.results[0].status.ToString();
  EXPECT_EQ(a.results[0].version, 1u);
  EXPECT_EQ(a.results[0].pulled_version, 1u);
  EXPECT_TRUE(a.results[1].status.ok());
  EXPECT_EQ(a.results[1].pulled_version, 1u);
  EXPECT_EQ(a.results[2].status.code(), Status::Code::kNotFound);
  EXPECT_EQ(a.results[3].status.code(), Status::Code::kInvalidArgument);
  EXPECT_NE(a.results[3].status.message().find("learning rate"), std::string::npos);
  EXPECT_EQ(a.results[4].status.code(), Status::Code::kInvalidArgument);
  EXPECT_TRUE(a.results[5].status.ok()) << a.results[5].status.ToString();
  EXPECT_EQ(a.results[5].version, 2u);
  ASSERT_EQ(params.size(), 3u * 32);
  std::vector<float> f(24);
  std::memcpy(f.data(), params.data(), params.size());
  for (int i = 0; i < 8; ++i) {
    EXPECT_EQ(f[i], 9.0f);
    EXPECT_EQ(f[8 + i], 9.0f);
    EXPECT_EQ(f[16 + i], 7.0f);
  }
  auto stats = nlohmann::json::parse(lc_->servers[0]->stats().ToJson());
  EXPECT_EQ(stats["pushes_applied"].get<int>(), 2);
  EXPECT_EQ(stats["batches"].get<int>(), 1);
  EXPECT_EQ(stats["batched_pushes"].get<int>(), 2);
  EXPECT_EQ(stats["grant_requests"].get<int>(), 0);
  // A batch that is wrong as a whole (an unknown worker) has every entry refused; the
  // connection stays.
  cluster::BatchRequest stranger;
  stranger.worker = 5;
  stranger.entries.push_back({.chunk_id = 1, .pull = true});
  stranger.entries.push_back({.chunk_id = 1, .pull = true});
  raw.SendBatch(8, stranger, {});
  auto more = raw.WaitAnswers(2);
  ASSERT_EQ(more.size(), 2u);
  EXPECT_EQ(more[1].first.batch, 8u);
  ASSERT_EQ(more[1].first.results.size(), 2u);
  for (const auto& x : more[1].first.results) {
    EXPECT_EQ(x.status.code(), Status::Code::kInvalidArgument);
    EXPECT_NE(x.status.message().find("unknown worker"), std::string::npos);
  }
  EXPECT_TRUE(more[1].second.empty());
  std::vector<float> out(8);
  ASSERT_TRUE(lc_->workers[0]->Pull(id_, out.data()).Wait(10s).ok());
  for (float v : out) EXPECT_EQ(v, 7.0f);
}

// Batches that do not add up close the connection that sent them; the server serves on.
TEST_F(ServerProtocol, MalformedBatchesCloseOnlyThatConnection) {
  cluster::BatchRequest one;
  one.entries.push_back({.chunk_id = 1, .push = true, .seq = 1, .bytes = 32});
  struct Case {
    const char* what;
    Bytes meta;
    Bytes payload;
  };
  auto encoded = [](const cluster::BatchRequest& b, size_t drop_tail = 0) {
    Bytes m = U64s({5});
    Writer w(&m);
    b.Encode(&w);
    m.resize(m.size() - drop_tail);
    return m;
  };
  Bytes junk = encoded(one);
  junk.push_back(0);
  cluster::BatchRequest none;  // no entries
  std::vector<Case> cases = {
      {"fewer bytes than the push claims", encoded(one), Bytes(16, 0)},
      {"more bytes than the pushes claim", encoded(one), Bytes(48, 0)},
      {"truncated entry", encoded(one, 3), Bytes(32, 0)},
      {"trailing junk", junk, Bytes(32, 0)},
      {"no entries", encoded(none), {}},
  };
  for (auto& c : cases) {
    RawClient raw(lc_->servers[0]->address());
    raw.conn().Send(cluster::kBatch, c.meta, transport::Payload::Own(c.payload), nullptr);
    EXPECT_TRUE(raw.WaitClosed()) << c.what;
  }
  std::vector<float> g(8, 1.0f), out(8);
  ASSERT_TRUE(lc_->workers[0]->PushPull(id_, g.data(), out.data()).Wait(10s).ok());
  for (float v : out) EXPECT_EQ(v, 9.0f);
}

// A batched push that must wait (its predecessor has not arrived) keeps the batch's bytes,
// charged to the server's inbound budget; when its connection closes they are given back, and
// nothing of it was applied.
TEST_F(ServerProtocol, AParkedBatchedPushHoldsItsBytesUntilItsConnectionCloses) {
  auto inbound = [&] {
    return nlohmann::json::parse(lc_->servers[0]->stats().ToJson())["inbound_bytes"].get<int64_t>();
  };
  {
    RawClient raw(lc_->servers[0]->address());
    cluster::BatchRequest b;
    b.entries.push_back({.chunk_id = 1, .push = true, .seq = 5, .bytes = 32});  // 1..4 missing
    std::vector<float> one(8, 1.0f);
    const auto* p = reinterpret_cast<const uint8_t*>(one.data());
    raw.SendBatch(1, b, Bytes(p, p + 32));
    const auto deadline = std::chrono::steady_clock::now() + 10s;
    while (inbound() < 32 && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(1ms);
    EXPECT_GE(inbound(), 32);
    EXPECT_EQ(raw.WaitAnswers(0).size(), 0u);  // not answered: it waits
  }
  const auto deadline = std::chrono::steady_clock::now() + 10s;
  while (inbound() != 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(1ms);
  EXPECT_EQ(inbound(), 0);
  std::vector<float> g(8, 1.0f), out(8);
  ASSERT_TRUE(lc_->workers[0]->PushPull(id_, g.data(), out.data()).Wait(10s).ok());
  for (float v : out) EXPECT_EQ(v, 9.0f);  // only the worker's push
}

// A landing buffer granted for one step of one chunk cannot carry another (a peer that claims a
// grant for what it was not granted is closed).
TEST_F(ServerProtocol, AGrantIsBoundToItsChunkAndStep) {
  RawClient raw(lc_->servers[0]->address());
  auto g = raw.Call(cluster::kGrant, GrantAsk(1, 8 * 4, 1));
  ASSERT_TRUE(g.ok());
  Grant grant = DecodeGrant(*g);
  Bytes note = U64s({1});
  Bytes body = PushNote(1, grant.buffer, 0, 5);  // granted for step 1, notified as step 5
  note.insert(note.end(), body.begin(), body.end());
  raw.SendRaw(cluster::kPushDone, note);
  EXPECT_TRUE(raw.WaitClosed());
}

TEST_F(ServerProtocol, MalformedMessagesCloseOnlyThatConnection) {
  struct Case {
    uint32_t tag;
    Bytes meta;
  };
  std::vector<Case> cases = {
      {cluster::kGrant, U64s({1})},                     // request id only: fields missing
      {cluster::kPushDone, U64s({1, 1})},               // truncated notification
      {cluster::kCreateChunks, U64s({1, 1ull << 40})},  // absurd count
      {cluster::kReplicaMembership, U64s({1, 0, 1})},   // truncated membership change
      {cluster::kReplicateStep, U64s({1, 0, 1})},       // truncated forwarded step
      {999, U64s({1})},                                 // unknown tag
      {cluster::kGrant, {}},                            // no request id at all
  };
  for (auto& c : cases) {
    RawClient raw(lc_->servers[0]->address());
    raw.SendRaw(c.tag, c.meta);
    EXPECT_TRUE(raw.WaitClosed()) << "tag " << c.tag;
  }
  // A push naming a landing buffer the connection does not hold is refused the same way.
  {
    RawClient raw(lc_->servers[0]->address());
    Bytes note = U64s({1});             // request id
    Bytes body = PushNote(1, 3, 0, 1);  // buffer 3 was never granted
    note.insert(note.end(), body.begin(), body.end());
    raw.SendRaw(cluster::kPushDone, note);
    EXPECT_TRUE(raw.WaitClosed());
  }
  // Wrong sizes and unknown chunks get an error reply, the connection stays.
  {
    RawClient raw(lc_->servers[0]->address());
    auto wrong = raw.Call(cluster::kGrant, GrantAsk(1, 12345));
    EXPECT_FALSE(wrong.ok());
    EXPECT_NE(wrong.status().message().find("12345 bytes"), std::string::npos)
        << wrong.status().ToString();
    auto unknown = raw.Call(cluster::kGrant, GrantAsk(777, 32));
    EXPECT_FALSE(unknown.ok());
    EXPECT_NE(unknown.status().message().find("unknown chunk 777"), std::string::npos);
    EXPECT_TRUE(raw.Call(cluster::kGrant, GrantAsk(1, 32)).ok());  // still served
  }
  // A membership change for a chunk this server is not the backup of is refused (a replaced
  // primary's is), and one for an unknown chunk is answered so; the connection stays.
  {
    RawClient raw(lc_->servers[0]->address());
    auto change = [](uint64_t chunk) {
      Bytes b;
      Writer w(&b);
      cluster::ReplicaMembership{0, chunk, 0, cluster::MembershipChange::kRemoved, 0}.Encode(&w);
      return b;
    };
    auto not_backup = raw.Call(cluster::kReplicaMembership, change(1));
    EXPECT_TRUE(not_backup.status().IsAborted()) << not_backup.status().ToString();
    auto unknown = raw.Call(cluster::kReplicaMembership, change(777));
    EXPECT_NE(unknown.status().message().find("unknown chunk 777"), std::string::npos)
        << unknown.status().ToString();
    EXPECT_TRUE(raw.Call(cluster::kGrant, GrantAsk(1, 32)).ok());  // still served
  }
  // So is a forwarded sync step (a replaced primary's is refused: this server serves the chunk).
  {
    RawClient raw(lc_->servers[0]->address());
    auto step = [](uint64_t chunk) {
      Bytes b;
      Writer w(&b);
      cluster::ForwardedStep{0, chunk, 1, std::nullopt, 1.0f, {0}}.Encode(&w);
      return b;
    };
    auto not_backup = raw.Call(cluster::kReplicateStep, step(1));
    EXPECT_TRUE(not_backup.status().IsAborted()) << not_backup.status().ToString();
    auto unknown = raw.Call(cluster::kReplicateStep, step(777));
    EXPECT_NE(unknown.status().message().find("unknown chunk 777"), std::string::npos)
        << unknown.status().ToString();
    EXPECT_TRUE(raw.Call(cluster::kGrant, GrantAsk(1, 32)).ok());  // still served
  }
  // The real worker is unaffected.
  std::vector<float> g(8, 1.0f), out(8);
  ASSERT_TRUE(lc_->workers[0]->PushPull(id_, g.data(), out.data()).Wait(10s).ok());
  EXPECT_EQ(out[0], 9.0f);
}

}  // namespace
}  // namespace shardps

namespace shardps {
namespace {

// Whether something accepts TCP connections on 127.0.0.1:port (plain socket probe).
bool Listening(uint16_t port) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  a.sin_port = htons(port);
  bool ok = connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  close(fd);
  return ok;
}

class ServerStartup : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    auto v = transport::CheckViability(GetParam());
    if (!v.viable) GTEST_SKIP() << GetParam() << ": " << v.reason;
  }
};

// A worker may reach a server's data port before that server has processed its registration
// reply. Its messages are held, without blocking the server's loop thread (which the server
// needs to allocate its landing pool), and answered once the server is ready. Here a raw client
// asks for a grant while the job still lacks its worker: no reply while the server waits; when
// the worker registers, the server starts well within its registration timeout and answers.
TEST_P(ServerStartup, MessagesBeforeReadyAreHeldWithoutBlockingTheLoop) {
  CoordinatorOptions co;
  co.num_servers = 1;
  co.num_workers = 1;
  co.mode = Mode::kAsync;
  co.transport = GetParam();
  co.heartbeat_timeout = 10s;
  auto coord = Coordinator::Start(co);
  ASSERT_TRUE(coord.ok()) << coord.status().ToString();
  const std::string addr = (*coord)->address();
  const uint16_t data_port = transport::FreeLoopbackPort();
  ASSERT_NE(data_port, 0);
  const std::string data = fmt::format("127.0.0.1:{}", data_port);
  ServerOptions so;
  so.coordinator = addr;
  so.listen = data;
  so.transport = GetParam();
  so.register_timeout = 30s;  // longer than everything below may take
  auto server = std::async(std::launch::async, [so] { return Server::Start(so); });

  // The server listens before it registers: wait until its port accepts.
  for (auto deadline = std::chrono::steady_clock::now() + 10s;
       !Listening(data_port) && std::chrono::steady_clock::now() < deadline;)
    std::this_thread::sleep_for(20ms);
  auto early = std::make_unique<RawClient>(data, GetParam());
  ASSERT_TRUE(early->connected());
  Bytes ask = GrantAsk(999, 4);  // no such chunk: the answer, once ready, is NotFound
  auto reply = std::async(std::launch::async, [&] { return early->Call(cluster::kGrant, ask); });
  EXPECT_EQ(reply.wait_for(300ms), std::future_status::timeout) << "answered before ready";

  WorkerOptions wo;
  wo.coordinator = addr;
  wo.transport = GetParam();
  wo.register_timeout = 20s;
  auto t0 = std::chrono::steady_clock::now();
  auto worker = Worker::Connect(wo);
  ASSERT_TRUE(worker.ok()) << worker.status().ToString();
  ASSERT_EQ(server.wait_for(10s), std::future_status::ready) << "server did not start";
  auto s = server.get();
  ASSERT_TRUE(s.ok()) << s.status().ToString();
  ASSERT_EQ(reply.wait_for(10s), std::future_status::ready);
  auto r = reply.get();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 10s);
  ASSERT_FALSE(r.ok());
  EXPECT_FALSE(r.status().IsTimeout()) << r.status().ToString();
  EXPECT_NE(r.status().message().find("unknown chunk 999"), std::string::npos)
      << r.status().ToString();

  early.reset();
  EXPECT_TRUE((*worker)->Finish().ok());
  EXPECT_TRUE((*coord)->Wait(10s).ok());
  EXPECT_TRUE((*s)->Wait(10s).ok());
}

std::vector<std::string> Backends() { return transport::BackendNames(); }

INSTANTIATE_TEST_SUITE_P(Transports, ServerStartup, ::testing::ValuesIn(Backends()),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace shardps

namespace shardps {
namespace {

// Compressed pushes from a peer that writes malformed encodings: each is refused with an error
// naming the tensor, nothing of it is applied, and the server goes on serving.
TEST(ServerCompressed, MalformedCompressedPushesAreRefusedNamingTheTensor) {
  CoordinatorOptions co;
  co.num_servers = 1;
  co.num_workers = 1;
  co.mode = Mode::kAsync;
  auto lc = testing::LocalCluster::Start(co);
  ASSERT_TRUE(lc);
  TensorSpec topk;
  topk.name = "sparse";
  topk.shape = {8};
  topk.init_value = 10;
  topk.optimizer.lr = 1.0f;
  topk.compression = Compression::Parse("topk:k=2,ef=off,min=0").value();
  TensorSpec int8 = topk;
  int8.name = "quantized";
  int8.compression = Compression::Parse("int8:block=4").value();
  auto ids = lc->workers[0]->Declare({topk, int8});
  ASSERT_TRUE(ids.ok()) << ids.status().ToString();
  RawClient raw(lc->servers[0]->address());
  // chunk 1: "sparse" (topk), chunk 2: "quantized" (int8, 2 blocks: 8 + 8 bytes).
  auto push = [&](uint64_t chunk, uint64_t seq, const Bytes& enc) -> Status {
    auto g = raw.Call(cluster::kGrant, GrantAsk(chunk, enc.size(), seq));
    if (!g.ok()) return g.status();
    Grant grant = DecodeGrant(*g);
    SHARDPS_RETURN_IF_ERROR(WriteGranted(raw, enc.data(), enc.size(), grant));
    return raw.Call(cluster::kPushDone, PushNote(chunk, grant.buffer, 0, seq, enc.size())).status();
  };
  auto topk_bytes = [](std::vector<uint32_t> idx, std::vector<float> val) {
    Bytes b;
    Writer w(&b);
    w.Put(static_cast<uint32_t>(idx.size()));
    for (uint32_t i : idx) w.Put(i);
    for (float v : val) w.Put(v);
    return b;
  };
  for (const auto& [enc, says] :
       std::vector<std::pair<Bytes, std::string>>{{topk_bytes({3, 3}, {1, 1}), "repeated"},
                                                  {topk_bytes({5, 2}, {1, 1}), "out of order"},
                                                  {topk_bytes({1, 8}, {1, 1}), "out of range"}}) {
    Status st = push(1, 1, enc);
    EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
    EXPECT_NE(st.message().find("tensor 'sparse'"), std::string::npos) << st.message();
    EXPECT_NE(st.message().find(says), std::string::npos) << st.message();
  }
  // A length the codec cannot have is refused at the grant.
  Status st = push(1, 1, Bytes(13, 0));
  EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
  EXPECT_NE(st.message().find("tensor 'sparse'"), std::string::npos) << st.message();
  // int8 with a NaN scale.
  Bytes q;
  {
    Writer w(&q);
    w.Put(1.0f);
    w.Put(std::numeric_limits<float>::quiet_NaN());
    for (int i = 0; i < 8; ++i) w.Put(static_cast<int8_t>(1));
  }
  st = push(2, 1, q);
  EXPECT_TRUE(st.IsInvalidArgument()) << st.ToString();
  EXPECT_NE(st.message().find("tensor 'quantized'"), std::string::npos) << st.message();
  EXPECT_NE(st.message().find("scale"), std::string::npos) << st.message();
  // Nothing was applied; a well-formed push still is, exactly.
  std::vector<float> out(8);
  ASSERT_TRUE(lc->workers[0]->Pull((*ids)[0], out.data()).Wait(10s).ok());
  for (float v : out) EXPECT_EQ(v, 10.0f);
  ASSERT_TRUE(push(1, 1, topk_bytes({2, 6}, {3, -4})).ok());
  ASSERT_TRUE(lc->workers[0]->Pull((*ids)[0], out.data()).Wait(10s).ok());
  for (int i = 0; i < 8; ++i) EXPECT_EQ(out[i], i == 2 ? 7.0f : i == 6 ? 14.0f : 10.0f) << i;
  auto stats = nlohmann::json::parse(lc->servers[0]->stats().ToJson());
  EXPECT_EQ(stats["pushes_applied"].get<int>(), 1);
  lc->Finish();
}

}  // namespace
}  // namespace shardps
