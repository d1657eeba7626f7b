// The chunk engine's rules without sockets: events in, actions out (src/server/chunk_engine.h).
// Gradients are integer-valued and the rule is sgd with lr 1, so every value is exact.
#include "server/chunk_engine.h"

#include <algorithm>
#include <cstring>
#include <functional>
#include <map>
#include <vector>

#include <gtest/gtest.h>

namespace shardps::server {
namespace {

constexpr uint64_t kN = 6;

OptimizerConfig Sgd() {
  OptimizerConfig o;
  o.kind = OptimizerKind::kSgd;
  o.lr = 1.0f;
  return o;
}

// A chunk of kN floats with initial value `init`, its landing buffers and the engine.
struct Fixture {
  explicit Fixture(Mode mode, uint32_t workers, Aggregate agg = Aggregate::kSum,
                   std::unique_ptr<UpdateRule> rule = nullptr, size_t max_grants = 1 << 16,
                   std::function<void(EngineActions)> later = nullptr)
      : Fixture(Config(mode, workers, agg, max_grants), std::move(rule), std::move(later)) {}

  static EngineConfig Config(Mode mode, uint32_t workers, Aggregate agg = Aggregate::kSum,
                             size_t max_grants = 1 << 16) {
    EngineConfig c;
    c.mode = mode;
    c.num_workers = workers;
    c.aggregate = agg;
    c.max_steps_ahead = 2;
    c.max_parked_grants = max_grants;
    return c;
  }

  explicit Fixture(EngineConfig c, std::unique_ptr<UpdateRule> rule = nullptr,
                   std::function<void(EngineActions)> later = nullptr)
      : layout(cluster::LayoutFor(kN)), slots(layout.stride * 2 / 8 + 1) {
    auto* f = reinterpret_cast<float*>(slots.data());
    for (uint64_t i = 0; i < kN; ++i) f[i] = 100.0f;
    if (!rule) rule = MakeCpuUpdateRule(Sgd(), kN, nullptr, 0);
    engine = std::make_unique<ChunkEngine>(
        c, std::move(rule), SlotMemory{reinterpret_cast<uint8_t*>(slots.data()), layout},
        [](std::function<void()> fn) { fn(); }, std::move(later));
  }

  // The published parameters of the current version.
  std::vector<float> Params() const {
    uint64_t v = engine->version();
    const auto* base = reinterpret_cast<const uint8_t*>(slots.data());
    const auto* f = reinterpret_cast<const float*>(base + (v % 2) * layout.stride);
    return std::vector<float>(f, f + kN);
  }
  uint64_t Tag(uint64_t slot) const {
    const auto* base = reinterpret_cast<const uint8_t*>(slots.data());
    uint64_t t;
    std::memcpy(&t, base + slot * layout.stride + layout.trailer_offset, 8);
    return t;
  }

  // A push of value `g` everywhere, by `worker`, step `seq`, in landing buffer `buffer`.
  EngineActions Push(uint32_t worker, uint64_t seq, float g, uint32_t buffer = 0,
                     uint64_t request = 0, uint64_t base_version = 0,
                     std::shared_ptr<transport::Connection> conn = nullptr,
                     std::optional<float> lr = std::nullopt) {
    auto& b = buffers[buffer];
    b.assign(kN, g);
    LandedPush p;
    p.worker = worker;
    p.seq = seq;
    p.lr = lr;
    p.base_version = base_version;
    p.reply.conn = std::move(conn);
    p.buffer = buffer;
    p.grad.data = b.data();
    p.grad.numel = kN;
    p.grad.bytes = kN * 4;
    p.reply.request = request ? request : seq * 100 + worker;
    return engine->OnPush(p);
  }

  cluster::SlotLayout layout;
  std::vector<uint64_t> slots;  // 8-aligned
  std::map<uint32_t, std::vector<float>> buffers;
  std::unique_ptr<ChunkEngine> engine;
};

std::vector<float> All(float v) { return std::vector<float>(kN, v); }

TEST(ChunkEngine, SyncPublishesWhenEveryWorkerPushedAndAcksThenWithTheVersion) {
  Fixture f(Mode::kSync, 3);
  EXPECT_EQ(f.Tag(0), 1u);  // version 0 sealed
  auto a = f.Push(0, 1, 1.0f);
  EXPECT_TRUE(a.acks.empty());
  EXPECT_EQ(a.release, std::vector<uint32_t>{0});
  EXPECT_EQ(f.Tag(1), 0u);  // the next slot holds the running sum: not a version
  a = f.Push(1, 1, 2.0f, 1);
  EXPECT_TRUE(a.acks.empty());
  EXPECT_EQ(f.engine->version(), 0u);
  a = f.Push(2, 1, 3.0f, 2);
  ASSERT_EQ(a.acks.size(), 3u);
  for (auto& ack : a.acks) {
    EXPECT_TRUE(ack.status.ok());
    EXPECT_EQ(ack.version, 1u);
  }
  EXPECT_EQ(a.published, 1u);
  EXPECT_EQ(a.applied, 1u);
  EXPECT_EQ(f.engine->version(), 1u);
  EXPECT_EQ(f.Tag(1), 2u);
  EXPECT_EQ(f.Params(), All(94.0f));
  EXPECT_EQ(f.engine->steps_open(), 0u);
}

// Sync with a backup that takes steps (EngineConfig::forward_steps): the primary sums every
// push of a step apart from the slots and hands the published step over with its pushes'
// acknowledgements instead of sending them; the backup applies that sum and holds the same
// bits (a mean of fractions: nothing exact about it but the arithmetic's order). Steps that
// arrive out of order (resent after a link was reopened) wait for their turn; a resent step is
// answered without being applied again; once the backup takes pushes (it was promoted), the
// steps still waiting are refused.
TEST(ChunkEngine, AForwardedStepGivesTheBackupTheSameBits) {
  EngineConfig c = Fixture::Config(Mode::kSync, 3, Aggregate::kMean);
  c.forward_steps = true;
  Fixture primary(c), backup(c);
  std::vector<EngineActions::Step> steps;
  for (uint64_t s = 1; s <= 5; ++s) {
    EngineActions a;
    for (uint32_t w = 0; w < 3; ++w) {
      EngineActions one = primary.Push(w, s, 0.1f * static_cast<float>(w + s), w);
      // The next slot still holds version s - 2 (no running sum there) until s is published.
      if (w == 0 && s >= 2) {
        EXPECT_EQ(primary.Tag(s % 2), s - 1);
      }
      a.Append(std::move(one));
    }
    EXPECT_TRUE(a.acks.empty());  // they go with the step
    ASSERT_EQ(a.steps.size(), 1u);
    EngineActions::Step& st = a.steps[0];
    EXPECT_EQ(st.seq, s);
    EXPECT_EQ(st.acks.size(), 3u);
    EXPECT_EQ(st.scale, 1.0f / 3.0f);
    std::vector<uint32_t> pushers = st.pushers;
    std::sort(pushers.begin(), pushers.end());
    EXPECT_EQ(pushers, (std::vector<uint32_t>{0, 1, 2}));
    ASSERT_TRUE(st.sum);
    steps.push_back(std::move(st));
  }
  auto send = [&](size_t i, uint64_t request) {
    ChunkEngine::ForwardedStep f;
    f.seq = steps[i].seq;
    f.pushers = steps[i].pushers;
    f.lr = steps[i].lr;
    f.scale = steps[i].scale;
    f.sum = steps[i].sum->data();
    f.reply.request = request;
    return backup.engine->OnForwardedStep(std::move(f));
  };
  EngineActions b = send(0, 1);
  ASSERT_EQ(b.acks.size(), 1u);
  EXPECT_TRUE(b.acks[0].status.ok()) << b.acks[0].status.ToString();
  EXPECT_EQ(b.acks[0].version, 1u);
  EXPECT_EQ(b.applied, 3u);
  // Step 3 before step 2: it waits, then both go, in order.
  b = send(2, 3);
  EXPECT_TRUE(b.acks.empty());
  EXPECT_EQ(backup.engine->version(), 1u);
  b = send(1, 2);
  ASSERT_EQ(b.acks.size(), 2u);
  EXPECT_EQ(b.acks[0].to.request, 2u);
  EXPECT_EQ(b.acks[0].version, 2u);
  EXPECT_EQ(b.acks[1].to.request, 3u);
  EXPECT_EQ(b.acks[1].version, 3u);
  EXPECT_EQ(backup.engine->version(), 3u);
  // Step 2 again (a resend after the link was reopened): answered, not applied.
  b = send(1, 4);
  ASSERT_EQ(b.acks.size(), 1u);
  EXPECT_TRUE(b.acks[0].status.ok());
  EXPECT_EQ(b.applied, 0u);
  EXPECT_EQ(backup.engine->version(), 3u);
  b = send(3, 5);
  b = send(4, 6);
  EXPECT_EQ(backup.engine->version(), 5u);
  EXPECT_EQ(std::memcmp(primary.Params().data(), backup.Params().data(), kN * sizeof(float)), 0);
  EXPECT_EQ(backup.engine->last_seqs(), (std::vector<uint64_t>{5, 5, 5}));
  // Promoted: a step still waiting (7, without 6) is refused once the backup takes pushes, which
  // go on from where the steps left it.
  steps[4].seq = 7;
  b = send(4, 7);
  EXPECT_TRUE(b.acks.empty());
  EngineActions p = backup.Push(0, 6, 1.0f, 0);
  ASSERT_EQ(p.acks.size(), 1u);
  EXPECT_TRUE(p.acks[0].status.IsAborted()) << p.acks[0].status.ToString();
  EXPECT_EQ(p.acks[0].to.request, 7u);
  backup.Push(1, 6, 1.0f, 1);
  backup.Push(2, 6, 1.0f, 2);
  EXPECT_EQ(backup.engine->version(), 6u);
}

// A copy for a new backup (docs/fault-tolerance.md, "New backups"): while the hold is on, a
// push that would open a step waits and the open one drains, whatever the order the pushes
// came in (worker 1's step 2 before its step 1); the engine is then quiet at version 1, grants
// go only to step 2, and once released the waiting pushes are taken, in order, and step 2 is
// published. on_take sees every push as the engine takes it, in that order.
TEST(ChunkEngine, HoldNewStepsDrainsTheOpenStepAndTakesTheRestOnRelease) {
  EngineConfig c = Fixture::Config(Mode::kSync, 2);
  std::vector<std::pair<uint32_t, uint64_t>> taken;
  c.on_take = [&](LandedPush& p) { taken.emplace_back(p.worker, p.seq); };
  Fixture f(c);
  f.Push(0, 1, 1.0f, 0);  // step 1 open
  f.engine->HoldNewSteps();
  EXPECT_FALSE(f.engine->Quiet());
  auto a = f.Push(0, 2, 2.0f, 1);  // would open step 2: held
  EXPECT_TRUE(a.acks.empty());
  a = f.Push(1, 2, 4.0f, 2);  // its step 1 is missing: parked
  EXPECT_TRUE(a.acks.empty());
  a = f.Push(1, 1, 3.0f, 3);  // step 1 complete: published; both step-2 pushes held
  EXPECT_EQ(a.published, 1u);
  EXPECT_EQ(f.engine->version(), 1u);
  EXPECT_EQ(f.engine->parked_pushes(), 2u);
  EXPECT_TRUE(f.engine->Quiet());
  EXPECT_EQ(f.Params(), All(96.0f));
  auto g2 = f.engine->Admit(ParkedGrant{{}, nullptr, 7, 0, 2});
  ASSERT_TRUE(g2.ok());
  EXPECT_TRUE(*g2);  // the next step
  auto g3 = f.engine->Admit(ParkedGrant{{}, nullptr, 8, 0, 3});
  ASSERT_TRUE(g3.ok());
  EXPECT_FALSE(*g3);  // beyond it: waits, holding no buffer
  a = f.engine->ReleaseHold();
  EXPECT_EQ(a.published, 1u);
  EXPECT_EQ(a.acks.size(), 2u);
  EXPECT_EQ(f.engine->version(), 2u);
  EXPECT_EQ(a.admit.size(), 1u);  // step 3's grant, within the steps ahead again
  EXPECT_EQ(f.Params(), All(90.0f));
  const std::vector<std::pair<uint32_t, uint64_t>> want = {{0, 1}, {1, 1}, {0, 2}, {1, 2}};
  EXPECT_EQ(taken, want);
}

TEST(ChunkEngine, MeanAggregationScalesByTheNumberOfWorkers) {
  Fixture f(Mode::kSync, 2, Aggregate::kMean);
  f.Push(0, 1, 4.0f);
  f.Push(1, 1, 8.0f, 1);
  EXPECT_EQ(f.Params(), All(94.0f));  // 100 - (4 + 8) / 2
}

TEST(ChunkEngine, PushesOfAWorkerArrivingOutOfOrderAreParkedAndAppliedInOrder) {
  for (Mode mode : {Mode::kSync, Mode::kAsync}) {
    SCOPED_TRACE(ModeName(mode));
    Fixture f(mode, 1);
    auto a = f.Push(0, 2, 5.0f, 7);  // step 2 before step 1
    EXPECT_TRUE(a.acks.empty());
    EXPECT_TRUE(a.release.empty());  // parked with its buffer
    EXPECT_EQ(a.parked_buffers_delta, 1);
    EXPECT_EQ(f.engine->parked_pushes(), 1u);
    a = f.Push(0, 1, 1.0f, 3);
    ASSERT_EQ(a.acks.size(), 2u);
    EXPECT_EQ(a.acks[0].to.request, 100u);
    EXPECT_EQ(a.acks[0].version, 1u);
    EXPECT_EQ(a.acks[1].to.request, 200u);
    EXPECT_EQ(a.acks[1].version, 2u);
    EXPECT_EQ(a.parked_buffers_delta, -1);
    EXPECT_EQ(a.applied, 2u);
    EXPECT_EQ(f.engine->parked_pushes(), 0u);
    EXPECT_EQ(f.Params(), All(94.0f));
  }
}

TEST(ChunkEngine, AResentPushIsAcknowledgedAndNeverAppliedTwice) {
  Fixture f(Mode::kSync, 2);
  f.Push(0, 1, 1.0f);
  // Resent before the step is published: answered when it is, with that version.
  auto a = f.Push(0, 1, 1.0f, 1, 555);
  EXPECT_EQ(a.duplicates, 1u);
  EXPECT_TRUE(a.acks.empty());
  EXPECT_EQ(a.release, std::vector<uint32_t>{1});
  a = f.Push(1, 1, 2.0f, 2);
  ASSERT_EQ(a.acks.size(), 3u);
  EXPECT_EQ(f.Params(), All(97.0f));
  // Resent after: answered at once, nothing applied.
  a = f.Push(1, 1, 2.0f, 3, 777);
  ASSERT_EQ(a.acks.size(), 1u);
  EXPECT_EQ(a.acks[0].to.request, 777u);
  EXPECT_EQ(a.duplicates, 1u);
  EXPECT_EQ(a.applied, 0u);
  EXPECT_EQ(f.Params(), All(97.0f));

  Fixture g(Mode::kAsync, 1);
  g.Push(0, 1, 1.0f);
  a = g.Push(0, 1, 1.0f);
  EXPECT_EQ(a.duplicates, 1u);
  ASSERT_EQ(a.acks.size(), 1u);
  EXPECT_EQ(g.engine->version(), 1u);
  EXPECT_EQ(g.Params(), All(99.0f));
}

// Sync: a worker may run max_steps_ahead (2) steps ahead of the published version. Its grant
// for step 3 waits, holding no buffer, until step 1 is published; then it is admitted.
TEST(ChunkEngine, GrantsBeyondTheStepsAheadWaitUntilTheChunkCatchesUp) {
  Fixture f(Mode::kSync, 2);
  for (uint64_t s = 1; s <= 2; ++s) {
    auto ok = f.engine->Admit(ParkedGrant{{}, nullptr, s, 0, s});
    ASSERT_TRUE(ok.ok());
    EXPECT_TRUE(*ok) << "step " << s;
  }
  auto r3 = f.engine->Admit(ParkedGrant{{}, nullptr, 3, 0, 3});
  ASSERT_TRUE(r3.ok());
  EXPECT_FALSE(*r3);
  auto r4 = f.engine->Admit(ParkedGrant{{}, nullptr, 4, 0, 4});
  EXPECT_FALSE(*r4);
  EXPECT_EQ(f.engine->parked_grants(), 2u);
  f.Push(0, 1, 1.0f);
  f.Push(0, 2, 1.0f, 1);
  EXPECT_EQ(f.engine->steps_open(), 2u);  // step 2 sums in its own accumulator
  auto a = f.Push(1, 1, 1.0f, 2);
  ASSERT_EQ(a.admit.size(), 1u);  // step 3 now, step 4 still waits
  EXPECT_EQ(a.admit[0].seq, 3u);
  EXPECT_EQ(f.engine->parked_grants(), 1u);
  a = f.Push(1, 2, 1.0f, 3);
  ASSERT_EQ(a.admit.size(), 1u);
  EXPECT_EQ(a.admit[0].seq, 4u);
  EXPECT_EQ(f.engine->version(), 2u);
  EXPECT_EQ(f.Params(), All(96.0f));
}

TEST(ChunkEngine, TooManyWaitingGrantsAreRefused) {
  Fixture f(Mode::kSync, 1, Aggregate::kSum, nullptr, /*max_grants=*/2);
  EXPECT_FALSE(*f.engine->Admit(ParkedGrant{{}, nullptr, 1, 0, 10}));
  EXPECT_FALSE(*f.engine->Admit(ParkedGrant{{}, nullptr, 2, 0, 11}));
  auto r = f.engine->Admit(ParkedGrant{{}, nullptr, 3, 0, 12});
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(), Status::Code::kResourceExhausted);
}

// A push beyond the steps ahead that arrives anyway (written into a buffer granted ahead) is
// parked with its buffer, and applied once the chunk caught up.
TEST(ChunkEngine, APushTooFarAheadIsParkedWithItsBuffer) {
  Fixture f(Mode::kSync, 2);
  f.Push(0, 1, 1.0f, 0);
  f.Push(0, 2, 1.0f, 1);
  auto a = f.Push(0, 3, 1.0f, 2);
  EXPECT_EQ(a.parked_buffers_delta, 1);
  EXPECT_TRUE(a.release.empty());
  a = f.Push(1, 1, 1.0f, 3);  // publishes 1; step 3 is now within reach and is summed
  EXPECT_EQ(a.parked_buffers_delta, -1);
  EXPECT_EQ(a.release.size(), 2u);  // buffers 3 and 2
  EXPECT_EQ(f.engine->version(), 1u);
  f.Push(1, 2, 1.0f, 4);
  f.Push(1, 3, 1.0f, 5);
  EXPECT_EQ(f.engine->version(), 3u);
  EXPECT_EQ(f.Params(), All(94.0f));
}

TEST(ChunkEngine, AMalformedGradientIsRefusedAndNothingIsApplied) {
  Fixture f(Mode::kSync, 1);
  std::vector<float> shorter(kN - 1, 1.0f);
  LandedPush p;
  p.worker = 0;
  p.seq = 1;
  p.buffer = 4;
  p.grad.data = shorter.data();
  p.grad.numel = kN - 1;
  p.grad.bytes = (kN - 1) * 4;
  auto a = f.engine->OnPush(p);
  ASSERT_EQ(a.acks.size(), 1u);
  EXPECT_FALSE(a.acks[0].status.ok());
  EXPECT_EQ(a.release, std::vector<uint32_t>{4});
  EXPECT_EQ(a.applied, 0u);
  EXPECT_EQ(f.engine->version(), 0u);
  // The same step sent again, well formed, is applied (the bad one did not count).
  a = f.Push(0, 1, 2.0f);
  EXPECT_EQ(a.applied, 1u);
  EXPECT_EQ(f.Params(), All(98.0f));
  // A worker outside the job is refused.
  a = f.Push(5, 1, 1.0f);
  ASSERT_EQ(a.acks.size(), 1u);
  EXPECT_FALSE(a.acks[0].status.ok());
}

TEST(ChunkEngine, AClosedConnectionsParkedPushesAndGrantsAreForgotten) {
  Fixture f(Mode::kSync, 2);
  // A stand-in connection object: the engine only compares its address.
  auto fake = std::shared_ptr<transport::Connection>(
      reinterpret_cast<transport::Connection*>(new char[1]),
      [](transport::Connection* c) { delete[] reinterpret_cast<char*>(c); });
  auto& b = f.buffers[9];
  b.assign(kN, 1.0f);
  LandedPush p;
  p.worker = 0;
  p.seq = 2;  // out of order: parked
  p.buffer = 9;
  p.grad.data = b.data();
  p.grad.numel = kN;
  p.grad.bytes = kN * 4;
  p.reply.conn = fake;
  f.engine->OnPush(p);
  EXPECT_FALSE(*f.engine->Admit(ParkedGrant{fake, fake.get(), 1, 0, 5}));
  EXPECT_EQ(f.engine->parked_pushes(), 1u);
  EXPECT_EQ(f.engine->parked_grants(), 1u);
  auto a = f.engine->OnConnectionClosed(fake.get());
  EXPECT_EQ(a.release, std::vector<uint32_t>{9});
  EXPECT_EQ(a.parked_buffers_delta, -1);
  EXPECT_EQ(f.engine->parked_pushes(), 0u);
  EXPECT_EQ(f.engine->parked_grants(), 0u);
}

// An update rule that completes later, as a device rule does: pushes that arrive meanwhile wait;
// the completion's actions go to the `later` sink, and the state stays exact.
class LaterRule final : public UpdateRule {
 public:
  explicit LaterRule(std::function<void(Done)>* pending)
      : cpu_(MakeCpuUpdateRule(Sgd(), kN, nullptr, 0)), pending_(pending) {}
  transport::MemoryKind memory() const override { return transport::MemoryKind::kHost; }
  uint64_t numel() const override { return kN; }
  std::unique_ptr<Accumulator> NewAccumulator() override { return cpu_->NewAccumulator(); }
  Status Check(const GradientView& g) const override { return cpu_->Check(g); }
  void Fold(float* dst, const GradientView& g, bool first) override { cpu_->Fold(dst, g, first); }
  void Apply(const float* in, float* out, const GradientView& grad, const GradientView* extra,
             float scale, std::optional<float> lr, const Publish* publish, Done done) override {
    cpu_->Apply(in, out, grad, extra, scale, lr, publish, [](Status) {});
    *pending_ = [done](Done) { done(Status::OK()); };
  }

 private:
  std::unique_ptr<UpdateRule> cpu_;
  std::function<void(Done)>* pending_;
};

TEST(ChunkEngine, AnUpdateThatCompletesLaterHoldsBackWhatArrivesMeanwhile) {
  std::function<void(UpdateRule::Done)> pending;
  std::vector<EngineActions> later;
  Fixture f(Mode::kAsync, 2, Aggregate::kSum, std::make_unique<LaterRule>(&pending), 1 << 16,
            [&](EngineActions a) { later.push_back(std::move(a)); });
  auto a = f.Push(0, 1, 1.0f, 0);
  EXPECT_TRUE(a.acks.empty());  // not complete yet
  EXPECT_EQ(f.engine->version(), 0u);
  a = f.Push(1, 1, 2.0f, 1);  // arrives while the update is in flight
  EXPECT_TRUE(a.acks.empty());
  ASSERT_TRUE(pending);
  auto first = std::move(pending);
  pending = nullptr;
  first(nullptr);  // completes the first update: the second one starts
  ASSERT_EQ(later.size(), 1u);
  ASSERT_EQ(later[0].acks.size(), 1u);
  EXPECT_EQ(later[0].acks[0].version, 1u);
  ASSERT_TRUE(pending);
  auto second = std::move(pending);
  pending = nullptr;
  second(nullptr);
  ASSERT_EQ(later.size(), 2u);
  ASSERT_EQ(later[1].acks.size(), 1u);
  EXPECT_EQ(later[1].acks[0].version, 2u);
  EXPECT_EQ(f.engine->version(), 2u);
  EXPECT_EQ(f.Params(), All(97.0f));
}

// Deep pipelining, checked exactly: 4 workers push 30 async steps each, every worker's pushes
// delivered in a scrambled order; the end state is the sum of all of them, each applied once.
TEST(ChunkEngine, AsyncScrambledPushesOfManyWorkersEndExact) {
  Fixture f(Mode::kAsync, 4);
  std::vector<std::pair<uint32_t, uint64_t>> order;
  for (uint64_t s = 1; s <= 30; ++s)
    for (uint32_t w = 0; w < 4; ++w) order.emplace_back(w, s);
  // A fixed permutation: reversed blocks of 7.
  for (size_t i = 0; i < order.size(); i += 7)
    std::reverse(order.begin() + i, order.begin() + std::min(order.size(), i + 7));
  uint64_t applied = 0, acks = 0;
  uint32_t buf = 0;
  for (auto [w, s] : order) {
    auto a = f.Push(w, s, static_cast<float>(w + 1), buf++);
    applied += a.applied;
    acks += a.acks.size();
  }
  EXPECT_EQ(applied, 120u);
  EXPECT_EQ(acks, 120u);
  EXPECT_EQ(f.engine->version(), 120u);
  EXPECT_EQ(f.engine->parked_pushes(), 0u);
  EXPECT_EQ(f.Params(), All(100.0f - 30.0f * (1 + 2 + 3 + 4)));
}

// ---- Bounded staleness (ssp:K), backup workers (sync quorum), per-worker weights ----

// A connection that does nothing: it only names a worker's peer for OnConnectionClosed.
class NullConnection final : public transport::Connection {
 public:
  void Send(uint32_t, Bytes, transport::Payload, transport::DoneCallback) override {}
  void Write(const void*, size_t, const transport::RemoteKey&, uint64_t,
             transport::DoneCallback) override {}
  void Read(void*, size_t, const transport::RemoteKey&, uint64_t,
            transport::DoneCallback) override {}
  void Write(const transport::LocalSpan&, const transport::RemoteKey&, uint64_t,
             transport::DoneCallback) override {}
  void Read(const transport::LocalSpan&, const transport::RemoteKey&, uint64_t,
            transport::DoneCallback) override {}
  void Close() override {}
  bool closed() const override { return false; }
  std::string peer() const override { return "null"; }
  void FailLater(transport::DoneCallback, Status) override {}
};

std::vector<uint64_t> Requests(const EngineActions& a) {
  std::vector<uint64_t> r;
  for (const auto& ack : a.acks) r.push_back(ack.to.request);
  return r;
}

TEST(ChunkEngine, SspAppliesAPushOnlyWithinKStepsOfTheSlowestWorker) {
  EngineConfig c = Fixture::Config(Mode::kSsp, 2);
  c.staleness = 1;
  std::vector<WorkerCounters> counters(2);
  c.counters = counters.data();
  Fixture f(c);
  // Worker 0 may push steps 1 and 2 while worker 1 has applied none (2 <= 0 + K + 1).
  EXPECT_EQ(Requests(f.Push(0, 1, 1.0f, 0)), std::vector<uint64_t>{100});
  EXPECT_EQ(Requests(f.Push(0, 2, 1.0f, 1)), std::vector<uint64_t>{200});
  EXPECT_EQ(f.engine->version(), 2u);
  // Step 3 must wait for worker 1's step 1: its grant waits, and a push that landed anyway (in
  // a buffer granted ahead) is parked with its buffer.
  auto g = f.engine->Admit(ParkedGrant{{}, nullptr, 77, 0, 3});
  ASSERT_TRUE(g.ok());
  EXPECT_FALSE(*g);
  auto a = f.Push(0, 3, 1.0f, 2);
  EXPECT_TRUE(a.acks.empty());
  EXPECT_EQ(a.parked_buffers_delta, 1);
  EXPECT_EQ(f.engine->version(), 2u);
  EXPECT_EQ(f.Params(), All(98.0f));
  EXPECT_EQ(counters[0].waits.load(), 2u);
  // Worker 1's step 1 lets step 3 go: applied in the same event, and the grant admitted.
  a = f.Push(1, 1, 10.0f, 3);
  EXPECT_EQ(Requests(a), (std::vector<uint64_t>{101, 300}));
  ASSERT_EQ(a.admit.size(), 1u);
  EXPECT_EQ(a.admit[0].request, 77u);
  EXPECT_EQ(a.parked_buffers_delta, -1);
  EXPECT_EQ(f.engine->version(), 4u);
  EXPECT_EQ(f.engine->slowest_clock(), 1u);
  EXPECT_EQ(f.Params(), All(87.0f));
  // Worker 1 ran 2 steps behind worker 0 when its first push was applied.
  EXPECT_EQ(counters[1].behind_max.load(), 2u);
  EXPECT_EQ(counters[0].pushes.load(), 3u);
}

TEST(ChunkEngine, SspZeroIsLockStepWithEachPushAppliedOnArrival) {
  EngineConfig c = Fixture::Config(Mode::kSsp, 3);
  c.staleness = 0;
  Fixture f(c);
  EXPECT_EQ(f.Push(0, 1, 1.0f, 0).acks.size(), 1u);  // applied at once (unlike sync)
  EXPECT_EQ(f.engine->version(), 1u);
  EXPECT_TRUE(f.Push(0, 2, 1.0f, 1).acks.empty());  // waits for everyone's step 1
  EXPECT_EQ(f.Push(1, 1, 2.0f, 2).acks.size(), 1u);
  auto a = f.Push(2, 1, 3.0f, 3);
  EXPECT_EQ(Requests(a), (std::vector<uint64_t>{102, 200}));
  EXPECT_EQ(f.engine->version(), 4u);
  EXPECT_EQ(f.Params(), All(93.0f));
}

TEST(ChunkEngine, SspWithALargeBoundBehavesAsAsync) {
  EngineConfig c = Fixture::Config(Mode::kSsp, 2);
  c.staleness = 1000000;
  Fixture f(c);
  for (uint64_t s = 1; s <= 50; ++s)  // worker 1 never pushes; worker 0 is never held
    ASSERT_EQ(f.Push(0, s, 1.0f, static_cast<uint32_t>(s)).acks.size(), 1u) << s;
  EXPECT_EQ(f.engine->version(), 50u);
  EXPECT_EQ(f.Params(), All(50.0f));
}

TEST(ChunkEngine, SspWorkerWhoseConnectionClosedNoLongerHoldsTheOthersBack) {
  EngineConfig c = Fixture::Config(Mode::kSsp, 2);
  c.staleness = 0;
  Fixture f(c);
  auto gone = std::make_shared<NullConnection>();
  auto stays = std::make_shared<NullConnection>();
  f.Push(1, 1, 1.0f, 0, 0, 0, gone);
  f.Push(0, 1, 1.0f, 1, 0, 0, stays);
  f.Push(0, 2, 1.0f, 2, 0, 0, stays);
  EXPECT_TRUE(f.Push(0, 3, 1.0f, 3, 0, 0, stays).acks.empty());  // waits for worker 1's step 2
  auto a = f.engine->OnConnectionClosed(gone.get());
  EXPECT_EQ(Requests(a), std::vector<uint64_t>{300});
  EXPECT_EQ(a.parked_buffers_delta, -1);
  EXPECT_EQ(f.engine->version(), 4u);
  EXPECT_EQ(Requests(f.Push(0, 4, 1.0f, 4, 0, 0, stays)), std::vector<uint64_t>{400});
}

// Replication: a push a replaced primary had forwarded out of order waits on the backup; the
// worker sends it again through its own connection once the backup serves the chunk. The resend
// takes over the waiting copy's answer (applied once, answered to the worker), and a resend
// through the same connection is still refused.
TEST(ChunkEngine, AResendThroughAnotherConnectionTakesOverTheWaitingCopy) {
  Fixture f(Mode::kAsync, 1);
  auto old_primary = std::make_shared<NullConnection>();
  auto worker = std::make_shared<NullConnection>();
  EXPECT_TRUE(f.Push(0, 2, 2.0f, 0, 7, 0, old_primary).acks.empty());  // waits for step 1
  auto a = f.Push(0, 2, 2.0f, 1, 8, 0, worker);
  EXPECT_TRUE(a.acks.empty());
  EXPECT_EQ(a.duplicates, 1u);
  EXPECT_EQ(a.release, std::vector<uint32_t>{1});
  a = f.Push(0, 2, 2.0f, 2, 9, 0, worker);  // the same connection again: refused
  ASSERT_EQ(a.acks.size(), 1u);
  EXPECT_TRUE(a.acks[0].status.code() == Status::Code::kAlreadyExists);
  a = f.Push(0, 1, 1.0f, 3, 5, 0, worker);
  ASSERT_EQ(a.acks.size(), 2u);
  EXPECT_EQ(a.acks[0].to.request, 5u);
  EXPECT_EQ(a.acks[1].to.request, 8u);  // the worker's, not the old primary's
  EXPECT_EQ(a.acks[1].to.conn, worker);
  EXPECT_EQ(f.engine->version(), 2u);
  EXPECT_EQ(f.Params(), All(97.0f));  // 100 - 1 - 2: each applied once
}

TEST(ChunkEngine, QuorumPublishesWithTheFirstNPushesAndDropsTheLateOne) {
  EngineConfig c = Fixture::Config(Mode::kSync, 3, Aggregate::kMean);
  c.quorum = 2;
  std::vector<WorkerCounters> counters(3);
  c.counters = counters.data();
  Fixture f(c);
  f.Push(0, 1, 4.0f, 0);
  auto a = f.Push(1, 1, 8.0f, 1);
  ASSERT_EQ(a.acks.size(), 2u);
  for (auto& ack : a.acks) EXPECT_FALSE(ack.late);
  EXPECT_EQ(f.engine->version(), 1u);
  EXPECT_EQ(f.Params(), All(94.0f));  // the mean over the 2 contributors
  a = f.Push(2, 1, 1000.0f, 2);       // late: acknowledged, dropped
  ASSERT_EQ(a.acks.size(), 1u);
  EXPECT_TRUE(a.acks[0].late);
  EXPECT_EQ(a.acks[0].version, 1u);
  EXPECT_EQ(a.release, std::vector<uint32_t>{2});
  EXPECT_EQ(a.late, 1u);
  EXPECT_EQ(a.applied, 0u);
  EXPECT_EQ(f.Params(), All(94.0f));
  EXPECT_EQ(counters[2].late.load(), 1u);
  EXPECT_EQ(counters[2].behind_max.load(), 1u);
  // The late worker contributes to the next step.
  f.Push(2, 2, 2.0f, 3);
  f.Push(0, 2, 4.0f, 4);
  EXPECT_EQ(f.engine->version(), 2u);
  EXPECT_EQ(f.Params(), All(91.0f));
  EXPECT_EQ(counters[0].pushes.load(), 2u);
  EXPECT_EQ(counters[1].pushes.load(), 1u);
  EXPECT_EQ(counters[2].pushes.load(), 1u);
}

// A worker removed from a sync job (it died: docs/fault-tolerance.md): the open step it had
// not pushed completes with the others, the mean over that step's contributors; a step it had
// pushed into still waits for every other; later steps need only the others; its pushes are
// refused from then on.
TEST(ChunkEngine, ARemovedWorkerNoLongerHoldsSyncStepsAndIsRefused) {
  Fixture f(Mode::kSync, 3, Aggregate::kMean);
  f.Push(0, 1, 3.0f, 0);
  f.Push(1, 1, 6.0f, 1);  // step 1 waits for worker 2
  f.Push(2, 2, 30.0f, 2);
  f.Push(2, 1, 1.5f, 3);  // ... which pushes it: step 1 published (3 contributors)
  EXPECT_EQ(f.engine->version(), 1u);
  EXPECT_EQ(f.Params(), All(96.5f));  // 100 - (3 + 6 + 1.5) / 3
  // Step 2 holds worker 2's push; worker 0's comes, then worker 2 is removed.
  f.Push(0, 2, 6.0f, 4);
  auto a = f.engine->RemoveWorker(2);
  EXPECT_TRUE(a.acks.empty());  // step 2 still waits for worker 1
  EXPECT_EQ(f.engine->version(), 1u);
  a = f.Push(1, 2, 9.0f, 5);
  ASSERT_EQ(a.acks.size(), 3u);
  EXPECT_EQ(f.engine->version(), 2u);
  EXPECT_EQ(f.Params(), All(81.5f));  // 96.5 - (30 + 6 + 9) / 3
  // Step 3: the two others publish it, the mean over them.
  f.Push(0, 3, 2.0f, 6);
  a = f.Push(1, 3, 4.0f, 7);
  ASSERT_EQ(a.acks.size(), 2u);
  EXPECT_EQ(f.engine->version(), 3u);
  EXPECT_EQ(f.Params(), All(78.5f));  // 81.5 - (2 + 4) / 2
  // A removed worker that comes back is fenced.
  a = f.Push(2, 3, 1000.0f, 8);
  ASSERT_EQ(a.acks.size(), 1u);
  EXPECT_TRUE(a.acks[0].status.IsAborted()) << a.acks[0].status.ToString();
  EXPECT_EQ(a.release, std::vector<uint32_t>{8});
  EXPECT_EQ(f.Params(), All(78.5f));
  // Removing it again changes nothing.
  EXPECT_TRUE(f.engine->RemoveWorker(2).acks.empty());
}

// The removal of the last worker a step waits for publishes it at once.
TEST(ChunkEngine, RemovingTheWorkerAStepWaitsForPublishesIt) {
  Fixture f(Mode::kSync, 3);
  f.Push(0, 1, 1.0f, 0);
  f.Push(1, 1, 2.0f, 1);
  auto a = f.engine->RemoveWorker(2);
  ASSERT_EQ(a.acks.size(), 2u);
  for (auto& ack : a.acks) EXPECT_EQ(ack.version, 1u);
  EXPECT_EQ(f.Params(), All(97.0f));
}

// A removed worker that rejoins (a restarted process): every step not yet published waits for
// it again, its next push is the step after the published one, and the mean is over 3 again.
TEST(ChunkEngine, ARejoinedWorkerIsWaitedForFromTheNextStep) {
  Fixture f(Mode::kSync, 3);
  uint32_t b = 0;
  for (uint32_t w = 0; w < 3; ++w) f.Push(w, 1, 1.0f, b++);
  EXPECT_EQ(f.engine->version(), 1u);
  // Worker 2 pushes step 2 and a step 4 that waits for its step 3, then dies.
  f.Push(2, 2, 10.0f, b++);
  auto a = f.Push(2, 4, 1000.0f, 77);
  EXPECT_TRUE(a.acks.empty());
  EXPECT_EQ(f.engine->parked_pushes(), 1u);
  a = f.engine->RemoveWorker(2);
  ASSERT_EQ(a.acks.size(), 1u);  // the parked step 4 is refused, its buffer released
  EXPECT_TRUE(a.acks[0].status.IsAborted()) << a.acks[0].status.ToString();
  EXPECT_EQ(a.acks[0].to.request, 402u);
  EXPECT_EQ(a.release, std::vector<uint32_t>{77});
  EXPECT_EQ(f.engine->parked_pushes(), 0u);
  // Step 2 keeps its push; steps 2 and 3 publish with the two others.
  for (uint64_t s = 2; s <= 3; ++s)
    for (uint32_t w = 0; w < 2; ++w) f.Push(w, s, 1.0f, b++);
  EXPECT_EQ(f.engine->version(), 3u);
  EXPECT_EQ(f.Params(), All(100.0f - 3.0f - 12.0f - 2.0f));
  // Worker 0 pushes step 4 before worker 2 rejoins: step 4 then waits for worker 2 too.
  f.Push(0, 4, 1.0f, b++);
  uint64_t next = 0;
  a = f.engine->RestoreWorker(2, &next);
  EXPECT_TRUE(a.acks.empty());
  EXPECT_EQ(next, 4u);
  EXPECT_FALSE(f.engine->removed(2));
  a = f.Push(1, 4, 1.0f, b++);
  EXPECT_TRUE(a.acks.empty());
  EXPECT_EQ(f.engine->version(), 3u);
  a = f.Push(2, 4, 5.0f, b++);
  ASSERT_EQ(a.acks.size(), 3u);
  for (auto& ack : a.acks) EXPECT_TRUE(ack.status.ok());
  EXPECT_EQ(f.engine->version(), 4u);
  EXPECT_EQ(f.Params(), All(83.0f - 7.0f));
  // Restoring a worker that is not removed changes nothing.
  EXPECT_TRUE(f.engine->RestoreWorker(2, &next).acks.empty());
  EXPECT_EQ(next, 0u);
}

// A rejoined worker whose tensor's other chunks are further on starts at their step (JoinAt):
// the steps before it no longer wait for it, and those from it do.
TEST(ChunkEngine, ARejoinedWorkerJoinsAtItsTensorsStep) {
  Fixture f(Mode::kSync, 3);
  uint32_t b = 0;
  for (uint32_t w = 0; w < 3; ++w) f.Push(w, 1, 1.0f, b++);
  f.engine->RemoveWorker(2);
  f.Push(0, 2, 1.0f, b++);
  f.Push(1, 2, 1.0f, b++);
  EXPECT_EQ(f.engine->version(), 2u);
  uint64_t next = 0;
  f.engine->RestoreWorker(2, &next);
  EXPECT_EQ(next, 3u);
  f.Push(0, 3, 1.0f, b++);
  auto a = f.Push(1, 3, 1.0f, b++);
  EXPECT_TRUE(a.acks.empty());  // step 3 waits for worker 2 ...
  a = f.engine->JoinAt(2, 5, &next);
  EXPECT_EQ(next, 5u);
  ASSERT_EQ(a.acks.size(), 2u);  // ... until it says it starts at step 5
  EXPECT_EQ(f.engine->version(), 3u);
  f.Push(0, 4, 1.0f, b++);
  a = f.Push(1, 4, 1.0f, b++);
  ASSERT_EQ(a.acks.size(), 2u);
  EXPECT_EQ(f.engine->version(), 4u);
  f.Push(0, 5, 1.0f, b++);
  a = f.Push(1, 5, 1.0f, b++);
  EXPECT_TRUE(a.acks.empty());  // step 5 is its
  a = f.Push(2, 5, 10.0f, b++);
  ASSERT_EQ(a.acks.size(), 3u);
  EXPECT_EQ(f.engine->version(), 5u);
  EXPECT_EQ(f.Params(), All(100.0f - 3.0f - 2.0f * 3 - 12.0f));
  // Not before its last push; nothing for a removed worker.
  f.engine->JoinAt(2, 2, &next);
  EXPECT_EQ(next, 6u);
  f.engine->RemoveWorker(2);
  f.engine->JoinAt(2, 9, &next);
  EXPECT_EQ(next, 0u);
}

// A new backup's copy taken while a rejoined worker's first step was ahead carries it: the copy's
// engine does not wait for the worker in the steps before it either.
TEST(ChunkEngine, ACopysStartStepsAreKept) {
  EngineConfig c = Fixture::Config(Mode::kSync, 3);
  c.initial_version = 2;
  c.initial_last_seq = {2, 2, 4};
  c.initial_join_from = {0, 0, 5};
  Fixture f(c);
  uint32_t b = 0;
  for (uint64_t s = 3; s <= 4; ++s) {
    f.Push(0, s, 1.0f, b++);
    auto a = f.Push(1, s, 1.0f, b++);
    ASSERT_EQ(a.acks.size(), 2u) << "step " << s;
  }
  f.Push(0, 5, 1.0f, b++);
  auto a = f.Push(1, 5, 1.0f, b++);
  EXPECT_TRUE(a.acks.empty());  // step 5 is worker 2's first
  a = f.Push(2, 5, 1.0f, b++);
  ASSERT_EQ(a.acks.size(), 3u);
  EXPECT_EQ(f.engine->version(), 5u);
}

// Removed while its push is folded into an open step, and back before that step is published:
// the push counts for it (its next push is the step after), and the mean is over 3.
TEST(ChunkEngine, ARejoinedWorkersPushInAnOpenStepCountsForIt) {
  Fixture f(Mode::kSync, 3, Aggregate::kMean);
  f.Push(2, 1, 6.0f, 0);
  f.engine->RemoveWorker(2);
  uint64_t next = 0;
  f.engine->RestoreWorker(2, &next);
  EXPECT_EQ(next, 2u);
  f.Push(0, 1, 3.0f, 1);
  auto a = f.Push(1, 1, 3.0f, 2);
  ASSERT_EQ(a.acks.size(), 3u);
  EXPECT_EQ(f.Params(), All(96.0f));  // 100 - 12 / 3
  // A push of the step by its new process is a resend: never applied twice.
  a = f.Push(2, 1, 1000.0f, 3);
  EXPECT_EQ(a.applied, 0u);
  EXPECT_EQ(f.Params(), All(96.0f));
}

// async and ssp: the rejoined worker's pushes go on from its last (async) or from the slowest
// live worker's clock (ssp), so it neither replays nor holds the others back for long.
TEST(ChunkEngine, ARejoinedWorkerGoesOnFromItsLastPushOrTheSlowestClock) {
  {
    Fixture f(Mode::kAsync, 2);
    f.Push(1, 1, 1.0f, 0);
    f.Push(1, 2, 1.0f, 1);
    f.engine->RemoveWorker(1);
    auto a = f.Push(1, 3, 50.0f, 2);
    ASSERT_EQ(a.acks.size(), 1u);
    EXPECT_TRUE(a.acks[0].status.IsAborted());
    uint64_t next = 0;
    f.engine->RestoreWorker(1, &next);
    EXPECT_EQ(next, 3u);
    a = f.Push(1, 3, 4.0f, 3);
    ASSERT_EQ(a.acks.size(), 1u);
    EXPECT_TRUE(a.acks[0].status.ok());
    EXPECT_EQ(f.Params(), All(94.0f));
  }
  {
    EngineConfig c = Fixture::Config(Mode::kSsp, 3);
    c.staleness = 1;
    Fixture f(c);
    uint32_t b = 0;
    f.Push(2, 1, 1.0f, b++);
    f.engine->RemoveWorker(2);
    for (uint64_t s = 1; s <= 4; ++s)
      for (uint32_t w = 0; w < 2; ++w) f.Push(w, s, 1.0f, b++);
    EXPECT_EQ(f.engine->slowest_clock(), 4u);
    uint64_t next = 0;
    f.engine->RestoreWorker(2, &next);
    EXPECT_EQ(next, 5u);
    // Until it pushes it holds nobody back; its push of 5 is admissible now.
    EXPECT_EQ(f.engine->slowest_clock(), 4u);
    auto a = f.Push(2, 5, 1.0f, b++);
    ASSERT_EQ(a.acks.size(), 1u);
    EXPECT_TRUE(a.acks[0].status.ok());
    EXPECT_EQ(f.Params(), All(100.0f - 10.0f));
    // From then on its clock counts with the others'.
    f.Push(0, 5, 1.0f, b++);
    EXPECT_EQ(f.engine->slowest_clock(), 4u);
    f.Push(1, 5, 1.0f, b++);
    EXPECT_EQ(f.engine->slowest_clock(), 5u);
  }
}

TEST(ChunkEngine, QuorumLateWorkerSkipsTheStepsPublishedWithoutIt) {
  EngineConfig c = Fixture::Config(Mode::kSync, 3);
  c.quorum = 2;
  Fixture f(c);
  uint32_t b = 0;
  for (uint64_t s = 1; s <= 3; ++s) {
    f.Push(0, s, 1.0f, b++);
    f.Push(1, s, 1.0f, b++);
  }
  EXPECT_EQ(f.engine->version(), 3u);
  // Worker 2 was told version 3 (a late ack) and pushes step 4 next: no wait for 1..3.
  auto a = f.Push(2, 4, 5.0f, b++);
  EXPECT_TRUE(a.acks.empty());
  EXPECT_EQ(a.applied, 1u);
  a = f.Push(0, 4, 1.0f, b++);
  EXPECT_EQ(Requests(a), (std::vector<uint64_t>{402, 400}));
  EXPECT_EQ(f.engine->version(), 4u);
  EXPECT_EQ(f.Params(), All(100.0f - 6.0f - 6.0f));
  // An older push of worker 2 still in flight: acknowledged, never applied.
  a = f.Push(2, 2, 1000.0f, b++);
  ASSERT_EQ(a.acks.size(), 1u);
  EXPECT_EQ(a.applied, 0u);
  EXPECT_EQ(f.Params(), All(88.0f));
}

TEST(ChunkEngine, FixedWorkerWeightsGiveTheWeightedSum) {
  for (Mode mode : {Mode::kSync, Mode::kAsync}) {
    SCOPED_TRACE(ModeName(mode));
    EngineConfig c = Fixture::Config(mode, 3);
    c.weights = {1.0f, 0.5f, 2.0f};
    Fixture f(c);
    f.Push(0, 1, 4.0f, 0);
    f.Push(1, 1, 4.0f, 1);
    f.Push(2, 1, 4.0f, 2);  // sync: the last push is fused into the update, weighted too
    EXPECT_EQ(f.Params(), All(100.0f - 4.0f - 2.0f - 8.0f));
    // Every push of step 2 through the accumulator (the weighted fold), last one of weight 1.
    f.Push(2, 2, 1.0f, 3);
    f.Push(1, 2, 2.0f, 4);
    f.Push(0, 2, 8.0f, 5);
    EXPECT_EQ(f.Params(), All(86.0f - 2.0f - 1.0f - 8.0f));
  }
}

TEST(ChunkEngine, StalenessRuleDividesTheWeightByOnePlusTheVersionsSinceTheBase) {
  EngineConfig c = Fixture::Config(Mode::kAsync, 2);
  c.weight_rule = WeightRule::kStaleness;
  c.weights = {1.0f, 2.0f};
  std::vector<WorkerCounters> counters(2);
  c.counters = counters.data();
  Fixture f(c);
  // eta = w / (1 + s), s = version before the apply - the push's base version.
  f.Push(0, 1, 4.0f, 0, 0, /*base=*/0);  // s 0: eta 1 -> 96
  EXPECT_EQ(f.Params(), All(96.0f));
  f.Push(1, 1, 4.0f, 1, 0, /*base=*/0);  // s 1: eta 2/2 -> 92
  EXPECT_EQ(f.Params(), All(92.0f));
  f.Push(0, 2, 6.0f, 2, 0, /*base=*/1);  // s 1: eta 1/2 -> 89
  EXPECT_EQ(f.Params(), All(89.0f));
  f.Push(1, 2, 8.0f, 3, 0, /*base=*/0);  // s 3: eta 2/4 -> 85
  EXPECT_EQ(f.Params(), All(85.0f));
  f.Push(0, 3, 8.0f, 4, 0, /*base=*/9);  // a base ahead of the version counts as 0
  EXPECT_EQ(f.Params(), All(77.0f));
  EXPECT_EQ(counters[1].staleness_max.load(), 3u);
  EXPECT_EQ(counters[1].staleness_sum.load(), 4u);
  EXPECT_EQ(counters[0].staleness_sum.load(), 1u);
}

}  // namespace
TEST(ChunkEngine, APushCarriesTheLearningRateOfTheUpdateItIsPartOf) {
  // Async: each push is its own update, at its own rate (declared: 1).
  Fixture a(Mode::kAsync, 2);
  a.Push(0, 1, 4.0f, 0, 0, 0, nullptr, 0.5f);  // 100 - 0.5 * 4
  EXPECT_EQ(a.Params(), All(98.0f));
  a.Push(1, 1, 4.0f, 1);  // the declared rate
  EXPECT_EQ(a.Params(), All(94.0f));
  a.Push(0, 2, 4.0f, 2, 0, 0, nullptr, 0.0f);  // a rate of 0 leaves the parameters
  EXPECT_EQ(a.Params(), All(94.0f));
  EXPECT_EQ(a.engine->version(), 3u);

  // Sync: a step's update takes the lowest-ranked worker's rate, whatever the arrival order,
  // both when the last push is fused into the update and when the step is published from the
  // accumulator later.
  Fixture s(Mode::kSync, 3);
  s.Push(2, 1, 1.0f, 0, 0, 0, nullptr, 8.0f);
  s.Push(1, 1, 2.0f, 1, 0, 0, nullptr, 0.25f);
  s.Push(0, 1, 1.0f, 2, 0, 0, nullptr, 0.5f);  // 100 - 0.5 * 4
  EXPECT_EQ(s.Params(), All(98.0f));
  // Step 3 is complete before step 2: it waits in an accumulator and is published after.
  s.Push(0, 2, 2.0f, 3, 0, 0, nullptr, 2.0f);
  s.Push(1, 2, 2.0f, 4, 0, 0, nullptr, 2.0f);
  s.Push(0, 3, 1.0f, 5, 0, 0, nullptr, 0.25f);
  s.Push(2, 3, 1.0f, 6, 0, 0, nullptr, 0.5f);
  s.Push(1, 3, 2.0f, 7, 0, 0, nullptr, 0.5f);
  EXPECT_EQ(s.engine->version(), 1u);
  auto done = s.Push(2, 2, 4.0f, 8, 0, 0, nullptr, 2.0f);  // 98 - 2 * 8, then - 0.25 * 4
  EXPECT_EQ(done.published, 2u);
  EXPECT_EQ(s.Params(), All(81.0f));
  // A step without a rate from its lowest-ranked pusher uses the declared one.
  s.Push(1, 4, 1.0f, 9, 0, 0, nullptr, 4.0f);
  s.Push(0, 4, 1.0f, 10);
  s.Push(2, 4, 1.0f, 11, 0, 0, nullptr, 4.0f);
  EXPECT_EQ(s.Params(), All(78.0f));
}

}  // namespace shardps::server
