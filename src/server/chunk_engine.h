// The chunk engine: the one place where a chunk's consistency rules live (docs/architecture.md,
// "Chunk engine"). It owns a chunk's published slots and version, the per-worker sequence
// table, pushes parked until they may be applied, the running sums of steps and the grant
// requests that wait for admission. It takes events (a grant asked for, a push landed, a
// connection closed) and returns actions (acknowledge, release a landing buffer, grant), so its
// rules are tested without sockets (tests/server/chunk_engine_test.cc).
//
// The rules:
// - Per worker, a chunk's pushes are applied in sequence order, each exactly once: a push
//   whose sequence number was applied already is a resend (acknowledged, not applied again); a
//   push that arrives before its predecessor is parked, holding its landing buffer, until the
//   predecessor was applied.
// - sync: version t is published when every worker's push of step t arrived; those pushes are
//   acknowledged then, with version t. Pushes of steps t+1..t+K (K = max_steps_ahead) are
//   summed as they arrive; a grant for a push beyond t+K waits (holding no buffer) until the
//   chunk has caught up, so a worker that runs ahead is slowed by credits, never the step
//   everyone waits on. A push beyond t+K that arrives anyway (written into a buffer granted
//   ahead) is parked with its buffer.
// - sync with a quorum of N < W (backup workers): a step is published once N pushes of it
//   arrived, and scaled by 1/N for the mean; a later push of a published step (or of a step
//   that has its N already) is dropped and acknowledged `late`, and the worker's next push is
//   for the step after the published version (the steps it skipped are not waited for).
// - async: each push is applied on arrival (in per-worker order) and acknowledged with the
//   version it produced.
// - ssp:K: as async, but a worker's push of step s (its s-th push to the chunk) is admitted
//   only once every live worker's step s - K - 1 was applied (clock = pushes applied): its
//   grant waits, holding no buffer, or the push is parked with the buffer it landed in. A
//   worker whose connection closed no longer holds the others back.
// - weights: each push is folded as eta * g, eta = the worker's weight, divided by 1 + s with
//   WeightRule::kStaleness (s: versions published since the version the push was based on).
//
// Threading: every method but Admit is called on the chunk's owner thread; Admit may be called
// on any thread (it takes the engine's grant lock and reads the published version atomically).
#pragma once

#include <atomic>
#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <vector>

#include "cluster/messages.h"
#include "server/update_rule.h"
#include "shardps/status.h"
#include "shardps/types.h"
#include "transport/connection.h"

namespace shardps::server {

// What each worker's pushes did, summed over the chunks of a server (its statistics). Written
// by the engines with relaxed atomics, read by anyone.
struct WorkerCounters {
  std::atomic<uint64_t> pushes{0};         // applied (sync: folded into a step)
  std::atomic<uint64_t> late{0};           // dropped: the step was published without them
  std::atomic<uint64_t> waits{0};          // held back by the consistency bound (grant or push)
  std::atomic<uint64_t> staleness_sum{0};  // versions between each applied push's base and
  std::atomic<uint64_t> staleness_max{0};  // the version it was applied to
  // The most steps a push of this worker trailed: the leading worker's clock (async, ssp) or
  // the published step (sync) at the time.
  std::atomic<uint64_t> behind_max{0};
};

struct LandedPush;

struct EngineConfig {
  Mode mode = Mode::kSync;
  // The pushers: every worker, or with node-level reduction every node, whose push is its
  // workers' sum (docs/node-reduction.md). The engine's "worker" is a pusher throughout.
  uint32_t num_workers = 1;
  // sync mean: what a step's sum is divided by; 0: the pushes of the step (the quorum). With
  // node-level reduction, the job's workers.
  uint32_t mean_over = 0;
  Aggregate aggregate = Aggregate::kMean;
  uint64_t max_steps_ahead = 2;  // sync: steps summed ahead of the published version
  size_t max_parked_grants = 1 << 16;
  uint32_t staleness = 0;      // ssp: K
  uint32_t quorum = 0;         // sync: pushes that publish a step (0: num_workers)
  std::vector<float> weights;  // per worker; empty: 1 each
  WeightRule weight_rule = WeightRule::kFixed;
  WorkerCounters* counters = nullptr;  // num_workers of them, or null
  // A chunk restored from a checkpoint starts at this version (its slot must hold it), with
  // every pusher's sequence number at it in sync mode (its next push is of step version + 1)
  // and at 0 otherwise (a new job's workers count their pushes from 1).
  uint64_t initial_version = 0;
  // Per pusher, the last sequence number applied (a new backup's copy: docs/fault-tolerance.md);
  // empty: none yet (sync: initial_version).
  std::vector<uint64_t> initial_last_seq;
  // Per pusher, a rejoined worker's first sync step (JoinAt) in a new backup's copy; empty: none.
  std::vector<uint64_t> initial_join_from;
  // Owner thread: called with each push the engine takes (applies, folds into a step, drops as
  // late or as a duplicate), in the order it takes them, before it is answered (a new backup is
  // sent pushes in that order: docs/fault-tolerance.md, "New backups").
  std::function<void(LandedPush&)> on_take;
  // sync, with a backup (docs/fault-tolerance.md, "A push"): every step is summed in an
  // accumulator, never in a slot nor fused with its last push, and handed over whole once
  // published (EngineActions::steps) with its pushes' acknowledgements, so that the primary
  // forwards the step's sum rather than each push; a backup applies such a step with
  // OnForwardedStep (which takes them whatever this is). Not for the device rule (its sums live
  // on the device).
  bool forward_steps = false;
  // Owner thread, with forward_steps: a sum of an earlier step that came back once sent (null:
  // none), asked for before a new accumulator is made.
  std::function<std::unique_ptr<Accumulator>()> spare_sum;
};

// A batch request being answered (the server's; cluster::BatchRequest).
struct BatchInFlight;
// A push forwarded to its chunk's backup, acknowledged once both copies hold it (the server's).
struct ReplicaJoin;

// Whom to answer: a request on a connection (tests use a null connection and distinct ids), or
// entry `entry` of a batch on that connection.
struct ReplyTo {
  std::shared_ptr<transport::Connection> conn;
  uint64_t request = 0;
  std::shared_ptr<BatchInFlight> batch;
  uint32_t entry = 0;
  // Replication (docs/fault-tolerance.md): the acknowledgement also waits for the backup's
  // (join), or it answers a primary's kReplicate (replica: no landing buffer granted ahead).
  std::shared_ptr<ReplicaJoin> join;
  bool replica = false;
};

// A push that travelled in a batch holds no landing buffer.
inline constexpr uint32_t kNoLandingBuffer = UINT32_MAX;

// A push whose bytes are in landing buffer `buffer`, or (kNoLandingBuffer) in memory that `hold`
// keeps alive for as long as the push is kept.
struct LandedPush {
  uint32_t worker = 0;
  uint64_t seq = 0;
  uint64_t base_version = 0;  // the version the gradient was computed from (PushDone)
  std::optional<float> lr;    // the update's learning rate (PushDone); none: the declared one
  uint32_t buffer = 0;
  std::shared_ptr<const void> hold;
  GradientView grad;
  ReplyTo reply;
  // 1 when it holds a landing buffer (counted in parked_buffers_delta), else 0.
  int holds_buffer() const { return buffer == kNoLandingBuffer ? 0 : 1; }
};

// A grant request that waits until its push is admissible.
struct ParkedGrant {
  std::weak_ptr<transport::Connection> conn;
  const transport::Connection* owner = nullptr;
  uint64_t request = 0;
  uint32_t worker = 0;
  uint64_t seq = 0;
};

struct EngineActions {
  struct Ack {
    ReplyTo to;
    Status status;
    uint64_t version = 0;
    bool late = false;  // dropped: its step was published without it
  };
  // A sync step published (EngineConfig::forward_steps): for the chunk's backup, with the
  // acknowledgements of its pushes, which wait for the backup's.
  struct Step {
    uint64_t seq = 0;
    std::vector<uint32_t> pushers;  // whose pushes it sums (each pusher's last sequence number)
    std::optional<float> lr;
    float scale = 1.0f;                // the update's factor of the sum
    std::unique_ptr<Accumulator> sum;  // numel floats (back with Recycle when not sent)
    std::vector<Ack> acks;             // its pushes', not in `acks`
  };
  std::vector<Ack> acks;           // answer these pushes
  std::vector<Step> steps;         // forward these (and then answer their pushes)
  std::vector<uint32_t> release;   // landing buffers the engine is done with (or kNoLandingBuffer)
  std::vector<ParkedGrant> admit;  // grant requests that are admissible now
  uint64_t applied = 0;            // pushes folded into the parameters
  uint64_t duplicates = 0;         // resent pushes acknowledged without applying
  uint64_t late = 0;               // pushes dropped because their step was published
  uint64_t published = 0;          // versions published
  uint64_t sums_allocated = 0;     // accumulators made for sync steps (none spare)
  int64_t parked_buffers_delta = 0;  // change in landing buffers held by parked pushes

  void Append(EngineActions&& o);
  bool empty() const { return acks.empty() && release.empty() && admit.empty() && steps.empty(); }
};

// Memory of the published slots (cluster::SlotLayout): slot v % 2 holds version v. With a
// pull codec (fp16, bf16) the slots hold the parameters encoded and `master` (numel floats,
// the initial values) the fp32 parameters that the updates work on in place.
struct SlotMemory {
  uint8_t* base = nullptr;
  cluster::SlotLayout layout;
  Codec publish = Codec::kNone;
  float* master = nullptr;
};

class ChunkEngine {
 public:
  // `rule` does the arithmetic; `slots` is where versions are published; slot 0 must hold the
  // initial values (version 0), sealed by the constructor. `later` routes actions of an update
  // that completes after Apply returned (a device rule) back to the owner; unused by rules that
  // complete inline.
  ChunkEngine(const EngineConfig& cfg, std::unique_ptr<UpdateRule> rule, SlotMemory slots,
              std::function<void(std::function<void()>)> to_owner = nullptr,
              std::function<void(EngineActions)> later = nullptr);

  // Any thread. True when a push of `g.seq` may take a landing buffer now; otherwise `g` is
  // kept and handed back in EngineActions::admit once it may. ResourceExhausted when too many
  // grants wait already.
  Result<bool> Admit(const ParkedGrant& g);

  // The rule goes first, while everything its last completion may touch is still here (a device
  // rule waits for its stream).
  ~ChunkEngine() { rule_.reset(); }

  // Owner thread.
  EngineActions OnPush(LandedPush p);
  // A sync step of the chunk's primary, whole (EngineConfig::forward_steps): the pushers whose
  // pushes `sum` (numel floats in host memory, kept alive by `hold`) holds, the update's
  // learning rate and factor of the sum.
  struct ForwardedStep {
    uint64_t seq = 0;
    std::vector<uint32_t> pushers;
    std::optional<float> lr;
    float scale = 1.0f;
    const float* sum = nullptr;
    std::shared_ptr<const void> hold;
    ReplyTo reply;
  };
  // Owner thread, a backup of a chunk whose primary forwards steps: applies step `f` as the
  // primary did (the same update of the same sum), once every step before it was; each pusher's
  // sequence number moves to it. `f.reply` is answered once it is published; a step published
  // already (a resend) at once. A step that arrives ahead of its turn (resent out of order after
  // a link was reopened) or during an update waits, up to kMaxStepsAhead of them; one that
  // arrives while pushes are open here (the backup was promoted) is refused.
  EngineActions OnForwardedStep(ForwardedStep f);
  // Owner thread: a step's sum that was not sent (the chunk has no backup now) serves a later
  // step (one that was sent comes back through EngineConfig::spare_sum).
  void Recycle(std::unique_ptr<Accumulator> sum) {
    if (sum) spare_.push_back(std::move(sum));
  }
  static constexpr size_t kMaxStepsAhead = 16;
  // Owner thread: forgets what `owner` left parked (its buffers come back in `release`).
  EngineActions OnConnectionClosed(const transport::Connection* owner);
  // Owner thread: pusher `worker` was removed from the job (it died: docs/fault-tolerance.md).
  // sync: a step is published once the others pushed it (the mean over its contributors); its
  // pushes already folded into an open step stay in it. ssp: its clock holds nobody back. Its
  // later pushes are refused (a paused worker that comes back is fenced).
  EngineActions RemoveWorker(uint32_t worker);
  // Owner thread: removed pusher `worker` rejoins the job (a restarted worker:
  // docs/fault-tolerance.md, "A worker that rejoins"). Sets `next_seq` to the sequence number
  // its next push to this chunk would have (0: it was not removed) and makes that push next in
  // line: sync, the step after the published version (or after its last push folded into an open
  // step, which counts for it again), every step from then on waiting for it again; ssp, the
  // slowest live worker's clock (it holds nobody back until it pushes); async, the one after its
  // last.
  EngineActions RestoreWorker(uint32_t worker, uint64_t* next_seq);
  // Owner thread: a rejoined worker's pushes start at `from` (the furthest `next_seq` of its
  // tensor's chunks, so that they share its steps), or after its last push if that is later:
  // `next_seq` is set to where. sync: the steps before it no longer wait for the worker.
  // FailedPrecondition for a removed worker.
  EngineActions JoinAt(uint32_t worker, uint64_t from, uint64_t* next_seq);
  bool removed(uint32_t worker) const { return worker < removed_.size() && removed_[worker]; }
  // Owner thread: the pushers removed, and each pusher's first step after it rejoined (a new
  // backup's copy carries them).
  std::vector<uint32_t> removed_workers() const;
  const std::vector<uint64_t>& join_froms() const { return join_from_; }

  uint64_t version() const { return version_.load(std::memory_order_acquire); }
  size_t parked_pushes() const { return parked_.size(); }
  size_t parked_grants() const;
  size_t steps_open() const { return steps_.size(); }
  // ssp: the clock (pushes applied) of the slowest live worker.
  uint64_t slowest_clock() const { return slowest_.load(std::memory_order_acquire); }
  const UpdateRule& rule() const { return *rule_; }
  UpdateRule& rule() { return *rule_; }
  // Owner thread: each pusher's last applied sequence number (a checkpoint's sequence table).
  const std::vector<uint64_t>& last_seqs() const { return last_seq_; }
  // Owner thread: whether an update or queued pushes are pending (a checkpoint waits for none).
  bool busy() const { return updating_ || !queued_.empty(); }

  // A copy for a new backup (docs/fault-tolerance.md, "New backups") is taken when the chunk is
  // quiet: no update in flight, nothing queued, no sync step open (its sum would not be in the
  // copy). Owner thread. While `HoldNewSteps` is on, a sync push that would open a step is
  // parked, so the open steps drain; `ReleaseHold` lets the parked pushes go on.
  // Meanwhile grants go only to pushes of the next step, so that held pushes do not take the
  // landing buffers the open steps' pushes need.
  bool Quiet() const { return !busy() && steps_.empty(); }
  void HoldNewSteps() { hold_new_steps_.store(true, std::memory_order_release); }
  EngineActions ReleaseHold();

 private:
  struct PendingAck {
    ReplyTo to;
    bool late = false;
  };
  struct Step {
    float* sum = nullptr;  // in the next slot while this step is next in line, else in `own`
    std::unique_ptr<Accumulator> own;
    uint32_t count = 0;
    std::vector<PendingAck> acks;
    // The step's learning rate: that of the lowest-ranked worker's push among its pushes (the
    // workers set the same one; if they do not, the choice does not depend on arrival order).
    std::optional<float> lr;
    uint32_t lr_from = UINT32_MAX;
    // Pushes in `count` from workers removed since (RemoveWorker): the step still waits for as
    // many of the others as the quorum.
    uint32_t removed_pushes = 0;
    std::vector<uint32_t> pushers;  // the workers whose pushes are in it
  };
  // Pushes that complete step `t`: the quorum (no more than the live workers that do not skip
  // it: a rejoined worker skips the steps before its first, JoinAt) and the pushes of workers
  // removed since they pushed into it.
  uint32_t Needed(uint64_t t, const Step& st) const;

  bool Admissible(uint64_t seq) const;
  bool GrantAdmissible(uint64_t seq) const;     // Admissible, and within a hold's bound
  bool HeldForCopy(const LandedPush& p) const;  // HoldNewSteps: it would open a step
  void Take(LandedPush& p) {
    if (cfg_.on_take) cfg_.on_take(p);
  }
  bool HeldBack(const LandedPush& p) const;  // Admissible, but for a backup's pushes (ssp)
  // Backup workers: every step before `seq` is published, so a push of `seq` need not wait for
  // the worker's pushes of them (they were, or would be, late).
  bool SkipsPublished(uint64_t seq) const { return backups_ && seq - 1 <= version(); }
  // The push's weight eta and its staleness (versions since its base).
  float WeightOf(const LandedPush& p, uint64_t* staleness) const;
  void CountApplied(const LandedPush& p, uint64_t staleness, uint64_t behind);
  // sync with a quorum: `p` arrived after its step was published (or had its quorum).
  void DropLate(LandedPush& p, EngineActions* out);
  // ssp: recomputes the slowest live worker's clock.
  void UpdateSlowest();
  WorkerCounters* Counters(uint32_t worker) const {
    return cfg_.counters && worker < cfg_.num_workers ? &cfg_.counters[worker] : nullptr;
  }
  // Processes p if it may be applied now; false when it must be parked.
  bool TryProcess(LandedPush& p, EngineActions* out);
  void ProcessSync(LandedPush& p, EngineActions* out);
  void ProcessAsync(LandedPush& p, EngineActions* out);
  // Applies the pending work until nothing more can move: queued pushes, complete steps,
  // parked pushes, admissible grants.
  void Drain(EngineActions* out);
  void PublishReadySteps(EngineActions* out);
  // Applies the forwarded steps whose turn it is (OnForwardedStep), while no update is in flight.
  void ApplyForwardedSteps(EngineActions* out);
  // The primary was replaced (a push arrived): the steps it forwarded that wait are refused.
  void DropForwardedSteps(EngineActions* out);
  // Computes version+1 into the next slot, seqlock style.
  void Update(const GradientView& grad, const GradientView* extra, float scale,
              std::optional<float> lr, std::function<void(EngineActions*)> then,
              EngineActions* out);
  void OnUpdateDone(Status st, EngineActions* out);
  void AdmitGrants(EngineActions* out);
  // The factor of a step's sum: 1, or for a mean 1 / its contributors.
  float Scale(uint32_t contributors) const;
  uint8_t* Slot(uint64_t v) const { return slots_.base + (v % 2) * slots_.layout.stride; }
  void Stamp(uint8_t* slot, uint64_t tag);
  GradientView SumView(const float* sum) const;

  const EngineConfig cfg_;
  std::unique_ptr<UpdateRule> rule_;
  const SlotMemory slots_;
  std::function<void(std::function<void()>)> to_owner_;
  std::function<void(EngineActions)> later_;

  std::atomic<uint64_t> version_{0};
  // Owner thread.
  const uint32_t configured_quorum_;  // sync: the quorum with every worker live
  uint32_t quorum_;                   // sync: pushes that publish a step
  bool backups_;                      // sync with a quorum below the workers (or one removed)
  uint32_t live_workers_;             // workers not removed (RemoveWorker)
  std::vector<bool> removed_;         // per worker
  std::vector<uint64_t> last_seq_;    // per worker
  // sync, per worker: its first step after it rejoined (RestoreWorker, JoinAt); the workers with
  // one some open step may be before (usually none).
  std::vector<uint64_t> join_from_;
  std::vector<uint32_t> joiners_;
  std::atomic<bool> hold_new_steps_{false};            // HoldNewSteps (read by Admit: any thread)
  std::vector<const transport::Connection*> conn_of_;  // per worker: its last push's
  std::vector<bool> departed_;                         // per worker: connection closed
  std::atomic<uint64_t> slowest_{0};                   // ssp: min clock, live workers
  std::map<uint64_t, Step> steps_;                     // sync: open steps
  std::map<std::pair<uint32_t, uint64_t>, LandedPush> parked_;  // (worker, seq)
  std::deque<LandedPush> queued_;                // arrived while an update was in flight
  std::map<uint64_t, ForwardedStep> forwarded_;  // forwarded steps waiting for their turn
  std::vector<std::unique_ptr<Accumulator>> spare_;
  bool updating_ = false;
  Status failure_;  // an update that failed: everything after it is refused
  std::function<void(EngineActions*)> after_update_;
  EngineActions* current_ = nullptr;  // the event being handled, where inline completions go

  mutable std::mutex grants_mu_;
  std::deque<ParkedGrant> grants_;  // guarded by grants_mu_
};

}  // namespace shardps::server
