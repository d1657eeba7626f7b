#include "shardps/worker.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <charconv>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <filesystem>
#include <future>
#include <map>
#include <mutex>
#include <optional>
#include <set>
#include <thread>
#include <unordered_map>

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "cluster/messages.h"
#include "cluster/node_client.h"
#include "cluster/rpc.h"
#include "compress/codec.h"
#include "core/checksum.h"
#include "core/environment.h"
#include "core/job_environment.h"
#include "gpu/cuda.h"
#include "metrics/metrics.h"
#include "metrics/timeline.h"
#include "server/checkpoint.h"
#include "transport/context.h"
#include "worker/node_reducer.h"

namespace shardps {

namespace worker {

// Completion state shared by a Handle and the callbacks of its chunk operations.
// What the worker's metrics count (docs/metrics.md), shared with the operations in flight so
// that one completing after the worker is gone still has them.
struct Meters {
  std::atomic<int64_t> in_flight{0};
  metrics::LatencyHistogram push, pull, push_pull;
  // --timeline: set before the first operation, never changed after.
  std::shared_ptr<metrics::Timeline> timeline;
};

struct OpState {
  std::mutex mu;
  std::condition_variable cv;
  std::atomic<size_t> remaining{0};  // written under mu; Wait polls it without the lock
  Status error;
  uint64_t version = UINT64_MAX;
  bool late = false;              // a chunk's push was dropped as late (backup workers)
  size_t acks_left = 0;           // chunk pushes not acknowledged yet
  uint64_t ack_min = UINT64_MAX;  // the lowest version over the chunks' acknowledgements

  std::chrono::microseconds poll{0};  // how long Wait polls before it sleeps
  // Counted on completion: the latency into `latency`, one fewer in flight.
  std::shared_ptr<Meters> meters;
  metrics::LatencyHistogram* latency = nullptr;  // one of meters' histograms
  std::chrono::steady_clock::time_point start;
  const char* op_name = "";  // for the timeline: push, pull, push_pull
  uint32_t tensor = 0;
  metrics::Timeline::Args span_args;  // the timeline's arguments (only with a timeline)
  // Called with it once it completed, on the thread that completed it (set before it starts).
  std::function<void(OpState&)> on_done;

  void ChunkDone(const Status& st, uint64_t v) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!st.ok() && error.ok()) error = st;
      version = std::min(version, v);
      if (remaining.load() == 1 && meters) {
        const auto now = std::chrono::steady_clock::now();
        latency->Observe(now - start);
        meters->in_flight.fetch_sub(1, std::memory_order_relaxed);
        if (meters->timeline)
          meters->timeline->Span(op_name, "worker", start, now, tensor, std::move(span_args));
      }
      if (--remaining != 0) return;
      cv.notify_all();
    }
    if (on_done) on_done(*this);
  }
};

}  // namespace worker

Status Handle::Wait(std::chrono::milliseconds timeout) const {
  if (!s_) return Status::InvalidArgument("waiting on an empty handle");
  // Operations on small tensors complete within microseconds: poll briefly (yielding the
  // core) before sleeping, which costs a wake-up of tens of microseconds on a busy machine.
  const auto entered = std::chrono::steady_clock::now();
  auto spin_until = entered + s_->poll;
  while (s_->remaining.load() != 0 && std::chrono::steady_clock::now() < spin_until)
    std::this_thread::yield();
  std::unique_lock<std::mutex> lock(s_->mu);
  const bool done = s_->cv.wait_for(lock, timeout, [&] { return s_->remaining == 0; });
  if (s_->meters && s_->meters->timeline)
    s_->meters->timeline->Span(
        "wait", "worker", entered, std::chrono::steady_clock::now(), s_->tensor,
        done ? metrics::Timeline::Args{} : metrics::Timeline::Args{{"timed_out"}, {1}});
  if (!done)
    return Status::Timeout(fmt::format("operation not complete after {} ms", timeout.count()));
  return s_->error;
}

bool Handle::done() const {
  if (!s_) return true;
  std::lock_guard<std::mutex> lock(s_->mu);
  return s_->remaining == 0;
}

bool Handle::late() const {
  if (!s_) return false;
  std::lock_guard<std::mutex> lock(s_->mu);
  return s_->late;
}

uint64_t Handle::version() const {
  if (!s_) return 0;
  std::lock_guard<std::mutex> lock(s_->mu);
  return s_->version == UINT64_MAX ? 0 : s_->version;
}

Result<TensorId> Worker::Declare(const TensorSpec& spec) {
  auto ids = Declare(std::vector<TensorSpec>{spec});
  if (!ids.ok()) return ids.status();
  return ids->front();
}

namespace {
constexpr int64_t kMaxLocalSize = 1024;
}  // namespace

Result<WorkerOptions> WorkerOptions::FromEnvironment(char** envp) {
  const Environment env(envp);
  WorkerOptions o;
  auto integer = [&](const Tunable& t, int64_t* out) -> Result<bool> {
    auto v = env.Get(t.env);
    if (!v) return false;
    auto [p, ec] = std::from_chars(v->data(), v->data() + v->size(), *out);
    if (ec != std::errc() || p != v->data() + v->size())
      return Status::InvalidArgument(fmt::format("{}='{}' is not an integer", t.env, *v));
    return true;
  };
  int64_t n = 0;
  if (auto v = env.Get(tunables::kCoordinator.env)) o.coordinator = *v;
  if (auto v = env.Get(tunables::kTransport.env)) o.transport = *v;
  if (auto v = env.Get(tunables::kSecretFile.env)) o.secret_file = *v;
  if (auto v = env.Get(tunables::kMetricsListen.env)) o.metrics_listen = *v;
  if (auto v = env.Get(tunables::kTimeline.env)) o.timeline = *v;
  if (auto v = env.Get(tunables::kTlsCert.env)) o.tls_cert = *v;
  if (auto v = env.Get(tunables::kTlsKey.env)) o.tls_key = *v;
  if (auto v = env.Get(tunables::kTlsCa.env)) o.tls_ca = *v;
  SHARDPS_ASSIGN_OR_RETURN(bool has_rank, integer(tunables::kRank, &n));
  if (has_rank) o.rank = static_cast<int32_t>(n);
  SHARDPS_ASSIGN_OR_RETURN(bool has_timeout, integer(tunables::kRpcTimeoutMs, &n));
  if (has_timeout) {
    if (n <= 0)
      return Status::InvalidArgument(
          fmt::format("{} must be positive", tunables::kRpcTimeoutMs.env));
    o.rpc_timeout = std::chrono::milliseconds(n);
  }
  SHARDPS_ASSIGN_OR_RETURN(bool has_poll, integer(tunables::kBusyPollUs, &n));
  if (has_poll) o.busy_poll = std::chrono::microseconds(n);
  SHARDPS_ASSIGN_OR_RETURN(bool has_fuse, integer(tunables::kFuseBytes, &n));
  if (has_fuse) {
    if (n < 0)
      return Status::InvalidArgument(
          fmt::format("{} must not be negative", tunables::kFuseBytes.env));
    o.fuse_bytes = static_cast<uint64_t>(n);
  }
  SHARDPS_ASSIGN_OR_RETURN(bool has_fuse_us, integer(tunables::kFuseUs, &n));
  if (has_fuse_us) o.fuse_delay = std::chrono::microseconds(n);
  SHARDPS_ASSIGN_OR_RETURN(bool has_per_node, integer(tunables::kWorkersPerNode, &n));
  if (has_per_node) {
    if (n < 1 || n > kMaxLocalSize)
      return Status::InvalidArgument(
          fmt::format("{}={} is outside [1, {}]", tunables::kWorkersPerNode.env, n, kMaxLocalSize));
    o.local_size = static_cast<uint32_t>(n);
  }
  if (auto v = env.Get(tunables::kNode.env)) o.node = *v;
  if (auto v = env.Get(tunables::kNodeReducer.env)) o.node_reducer = *v;
  SHARDPS_ASSIGN_OR_RETURN(bool has_local, integer(tunables::kLocalRank, &n));
  if (has_local) {
    o.local_rank = static_cast<int32_t>(n);
  } else if (o.local_size > 1) {
    // The launcher's own local rank (torchrun, mpirun, srun), read in one place.
    auto placed = DetectJobPlacement(env);
    if (placed.ok()) o.local_rank = placed->local_rank;
    if (!placed.ok() && !placed.status().IsNotFound()) return placed.status();
  }
  if (o.local_size > 1 && o.local_rank < 0)
    return Status::InvalidArgument(fmt::format(
        "{}={} but this worker's local rank is unknown: set {} or run it under a launcher that "
        "sets LOCAL_RANK, OMPI_COMM_WORLD_LOCAL_RANK or SLURM_LOCALID",
        tunables::kWorkersPerNode.env, o.local_size, tunables::kLocalRank.env));
  for (const Tunable* t : {&tunables::kConnectionInbound, &tunables::kProcessInbound}) {
    SHARDPS_ASSIGN_OR_RETURN(bool has, integer(*t, &n));
    if (!has) continue;
    if (n <= 0) return Status::InvalidArgument(fmt::format("{} must be positive", t->env));
    (t == &tunables::kConnectionInbound ? o.connection_inbound_bytes : o.process_inbound_bytes) =
        static_cast<uint64_t>(n);
  }
  o.transport_settings = env.WithPrefix("UCX_");
  if (o.coordinator.empty())
    return Status::InvalidArgument(
        "SHARDPS_COORDINATOR is not set: run this program under `shardps launch`, or set it to "
        "the coordinator's host:port");
  return o;
}

namespace {
constexpr uint64_t kMaxFuseBytes = 16ull << 20;
}  // namespace

Status WorkerOptions::Validate() const {
  if (coordinator.empty()) return Status::InvalidArgument("the worker needs a coordinator address");
  if (busy_poll.count() < 0 || busy_poll.count() > 1000000)
    return Status::InvalidArgument(
        fmt::format("busy poll of {} us outside [0, 1000000]", busy_poll.count()));
  if (fuse_bytes > kMaxFuseBytes)
    return Status::InvalidArgument(
        fmt::format("fuse bytes {} outside [0, {}]", fuse_bytes, kMaxFuseBytes));
  if (fuse_delay.count() < 0 || fuse_delay.count() > 1000000)
    return Status::InvalidArgument(
        fmt::format("fuse delay of {} us outside [0, 1000000]", fuse_delay.count()));
  if (local_size < 1 || local_size > kMaxLocalSize)
    return Status::InvalidArgument(
        fmt::format("{} workers per node outside [1, {}]", local_size, kMaxLocalSize));
  if (node_reducer != "auto" && node_reducer != "shm" && node_reducer != "nccl")
    return Status::InvalidArgument(
        fmt::format("node reducer '{}' is none of auto, shm, nccl", node_reducer));
  if (local_size > 1 && (local_rank < 0 || static_cast<uint32_t>(local_rank) >= local_size))
    return Status::InvalidArgument(
        fmt::format("local rank {} outside [0, {}] ({} workers per node)", local_rank,
                    local_size - 1, local_size));
  auto v = transport::CheckViability(transport);
  if (!v.viable) return Status::InvalidArgument("transport " + transport + ": " + v.reason);
  return Status::OK();
}

namespace worker {
namespace {

using namespace cluster;
using transport::Connection;

constexpr int kMaxReadAttempts = 100000;
// The one-round-trip pull over a transport that serves reads in issue order relies on the
// target copying the floats before the tag in program order, which x86-64 guarantees (loads are
// not reordered with older loads); elsewhere the pull keeps its two round trips. The servers
// are taken to be of the workers' architecture.
#if defined(__x86_64__)
constexpr bool kLoadsStayInOrder = true;
#else
constexpr bool kLoadsStayInOrder = false;
#endif
constexpr uint64_t kCreateBatchBytes = 32ull << 20;
constexpr uint32_t kCreateBatchItems = 4096;

// Raises `a` to `v` if `v` is larger (versions seen only move forward).
void RaiseTo(std::atomic<uint64_t>& a, uint64_t v) {
  uint64_t cur = a.load();
  while (v > cur && !a.compare_exchange_weak(cur, v)) {
  }
}

struct ChunkRef {
  uint64_t chunk_id = 0;
  // The server that serves it now: its primary, or once the primary was declared dead its
  // backup (docs/fault-tolerance.md).
  std::atomic<uint32_t> server{0};
  // Its backup, if it has one (docs/fault-tolerance.md): as declared, or a new one made after a
  // failover; kNoServer once it moved to it.
  std::atomic<uint32_t> backup{kNoServer};
  // A new backup being attached to (kBackupsAdded, not answered yet): an operation that finds
  // its server dead meanwhile waits for the attach instead of failing.
  std::atomic<uint32_t> attaching{kNoServer};
  CreateChunkItem create;  // as declared: what attaching to a new backup names
  uint64_t offset = 0;
  uint64_t numel = 0;
  compress::ChunkCodec codec;   // how its pushes are encoded
  uint64_t encoded_offset = 0;  // where its encoding starts in the tensor's staging buffer
  uint64_t encoded_bytes = 0;
  Codec pull_codec = Codec::kNone;
  // Its slots on each server that held a copy of it: its primary and backup as declared, then
  // each new backup. Appended to (under the failover mutex, or while declaring), never changed,
  // so that an operation reading one never sees it change.
  static constexpr uint32_t kMaxCopies = 16;
  std::array<uint32_t, kMaxCopies> copy_server{};
  std::array<ChunkSlots, kMaxCopies> copy_slots;
  std::atomic<uint32_t> copies{0};
  bool AddCopy(uint32_t on, ChunkSlots s) {
    const uint32_t n = copies.load(std::memory_order_relaxed);
    if (n == kMaxCopies) return false;
    copy_server[n] = on;
    copy_slots[n] = std::move(s);
    copies.store(n + 1, std::memory_order_release);
    return true;
  }
  // Its slots on `server` (the newest copy there).
  const ChunkSlots& SlotsOn(uint32_t on) const {
    for (uint32_t i = copies.load(std::memory_order_acquire); i-- > 0;)
      if (copy_server[i] == on) return copy_slots[i];
    return copy_slots[0];
  }
  SlotLayout layout;
  std::atomic<uint64_t> known_version{0};
  std::atomic<uint64_t> pulled_version{0};  // the newest version pulled: a push's base
  // The tensor's next push step (TensorInfo::next_step), shared by its chunks.
  std::atomic<uint64_t>* tensor_step = nullptr;
  // A worker that rejoined the job (docs/fault-tolerance.md): the sequence number its primary
  // said at attach its next push must have (ChunkSlots::next_seq); 0 otherwise.
  uint64_t rejoin_next = 0;
  // Node-level reduction: the local rank that pushes it for the node.
  uint32_t owner = 0;
};

// Registered buffers that a tensor's pushes are encoded into, one per push in flight: taken
// when a push starts, given back when its last chunk was written. Thread-safe.
class StagingPool : public std::enable_shared_from_this<StagingPool> {
 public:
  StagingPool(transport::Context* ctx, uint64_t bytes) : ctx_(ctx), bytes_(bytes) {}

  // A buffer for one push; it comes back to the pool when the last reference goes.
  Result<std::shared_ptr<transport::MemoryRegion>> Take() {
    std::unique_ptr<transport::MemoryRegion> r;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_.empty()) {
        r = std::move(free_.back());
        free_.pop_back();
      }
    }
    if (!r) {
      auto made = ctx_->AllocateRegion(bytes_);
      if (!made.ok()) return made.status().WithContext("allocating a compression buffer");
      r = std::move(made).value();
    }
    std::weak_ptr<StagingPool> pool = weak_from_this();
    return std::shared_ptr<transport::MemoryRegion>(
        r.release(), [pool](transport::MemoryRegion* m) {
          std::unique_ptr<transport::MemoryRegion> own(m);
          if (auto p = pool.lock()) {
            std::lock_guard<std::mutex> lock(p->mu_);
            p->free_.push_back(std::move(own));
          }
        });
  }

 private:
  transport::Context* ctx_;
  const uint64_t bytes_;
  std::mutex mu_;
  std::vector<std::unique_ptr<transport::MemoryRegion>> free_;  // guarded by mu_
};

// Operations on one server's small chunks (cluster::kMaxBatchedChunkBytes) that travel in one
// kBatch (docs/protocol.md, "Batches"): those waiting to be sent, and those sent and not yet
// answered. Thread-safe; answers arrive on the data loop thread.
class Batcher {
 public:
  struct Item {
    ChunkRef* ref = nullptr;
    std::shared_ptr<OpState> op;
    bool push = false;
    float* pull_into = nullptr;  // a pull's (or push_pull's) destination
    // With replication, what it takes to send it again to the chunk's backup: its entry and
    // its gradient's bytes (Fail hands them to `resend`).
    BatchEntry entry;
    std::shared_ptr<const Bytes> grad;
  };

  // Replication: items keep their entry and bytes until answered, to be sent again.
  explicit Batcher(bool keep = false) : keep_(keep) {}

  // Adds an operation; true when the batch should go now (its size bound is reached). `grad`:
  // the push's bytes as they travel (copied here). With a `window` (sync), a push more than
  // `window` steps ahead of the newest version the worker knows of its chunk, or behind one
  // that is, waits here instead (Release sends it once an answer raised that version): the
  // server would have to park it, holding the batch's bytes, where a grant would have waited
  // holding nothing. It waits only while an operation on its chunk is in flight here, whose
  // answer runs Release: a version known from long ago (a worker that attached while the
  // others were some steps in, then pushed nothing) would otherwise hold it for ever.
  bool Add(Item item, const BatchEntry& e, const void* grad, uint64_t fuse_bytes, uint64_t window) {
    if (keep_) {
      item.entry = e;
      if (e.push && !item.grad) {
        const auto* g = static_cast<const uint8_t*>(grad);
        item.grad = std::make_shared<const Bytes>(g, g + e.bytes);
      }
    }
    std::unique_lock<std::mutex> lock(mu_);
    if (!failed_.ok()) {
      Status st = failed_;
      auto resend = resend_;
      lock.unlock();
      if (resend) {
        resend(std::move(item));  // it waits for the chunk to move to its backup
      } else {
        item.op->ChunkDone(st, 0);
      }
      return false;
    }
    if (e.push && window > 0) {
      auto it = deferred_.find(item.ref);
      if ((it != deferred_.end() && !it->second.empty()) ||
          (e.seq > item.ref->known_version.load() + window && InFlight(item.ref))) {
        const auto* g = static_cast<const uint8_t*>(grad);
        deferred_[item.ref].push_back({std::move(item), e, Bytes(g, g + e.bytes)});
        return false;
      }
    }
    return AddLocked(std::move(item), e, grad, fuse_bytes);
  }

  // After an answer about `ref`: its waiting pushes now within `window` of the version known
  // (all of them with `all`: the chunk answered an error, the server decides) join the batch,
  // in order; a batch that reaches its size bound meanwhile is sent. True when some joined and
  // wait to be sent.
  bool Release(ChunkRef* ref, uint64_t window, bool all, uint64_t fuse_bytes,
               transport::Connection& c, uint32_t worker, std::atomic<uint64_t>* pushed) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = deferred_.find(ref);
    if (it == deferred_.end()) return false;
    auto& q = it->second;
    bool joined = false;
    while (!q.empty() &&
           (all || q.front().entry.seq <= ref->known_version.load() + window || !InFlight(ref))) {
      Deferred d = std::move(q.front());
      q.pop_front();
      if (AddLocked(std::move(d.item), d.entry, d.grad.data(), fuse_bytes)) {
        SendLocked(c, worker, pushed);
        joined = false;
      } else {
        joined = true;
      }
    }
    if (q.empty()) deferred_.erase(it);
    return joined;
  }

  // When the oldest operation waiting was added (meaningful while one waits).
  std::chrono::steady_clock::time_point Oldest() {
    std::lock_guard<std::mutex> lock(mu_);
    return first_;
  }

  // Marks a flush as scheduled; false when one is already.
  bool Schedule() {
    std::lock_guard<std::mutex> lock(mu_);
    if (posted_) return false;
    posted_ = true;
    return true;
  }

  // Sends what waits unless its oldest operation is younger than `delay` (then false).
  bool Flush(transport::Connection& c, uint32_t worker, std::chrono::microseconds delay,
             std::atomic<uint64_t>* pushed) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!items_.empty() && delay.count() > 0 && std::chrono::steady_clock::now() - first_ < delay)
      return false;
    if (delay.count() == 0) posted_ = false;
    SendLocked(c, worker, pushed);
    return true;
  }

  // Sends what waits now (the size bound was reached).
  void Send(transport::Connection& c, uint32_t worker, std::atomic<uint64_t>* pushed) {
    std::lock_guard<std::mutex> lock(mu_);
    SendLocked(c, worker, pushed);
  }

  // An answer: the items it completes, with their results and where their parameters are in
  // the payload. False when it is malformed (it answers nothing sent, or an entry twice, or
  // its parameters do not match what was asked).
  struct Completed {
    Item item;
    BatchResult result;
    const uint8_t* params = nullptr;
  };
  bool OnAnswer(const BatchAnswer& a, const transport::Buffer& payload,
                std::vector<Completed>* out) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = sent_.find(a.batch);
    if (it == sent_.end()) return false;
    Sent& b = it->second;
    uint64_t at = 0;
    std::vector<bool> seen = b.answered;  // an entry answered twice, even in one answer, is refused
    for (const BatchResult& x : a.results) {
      if (x.entry >= b.items.size() || seen[x.entry]) return false;
      seen[x.entry] = true;
      const Item& item = b.items[x.entry];
      const uint64_t want =
          x.status.ok() && item.pull_into ? item.ref->layout.data_bytes : uint64_t{0};
      if (x.pulled_bytes != want || want > payload.size() - at) return false;
      at += want;
    }
    if (at != payload.size()) return false;
    at = 0;
    for (const BatchResult& x : a.results) {
      b.answered[x.entry] = true;
      auto n = inflight_.find(b.items[x.entry].ref);
      if (n != inflight_.end() && --n->second == 0) inflight_.erase(n);
      out->push_back({b.items[x.entry], x, payload.data() + at});
      at += x.pulled_bytes;
    }
    b.remaining -= a.results.size();
    if (b.remaining == 0) sent_.erase(it);
    return true;
  }

  // The connection or the job failed: every operation waiting or not answered fails with
  // `why` (or, with `resend`, is handed to it: replication), and so does every later one.
  void Fail(const Status& why, const std::function<void(Item)>& resend = nullptr) {
    std::vector<Item> fail;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (failed_.ok()) failed_ = why;
      if (keep_ && resend && !resend_) resend_ = resend;
      for (auto& item : items_) fail.push_back(std::move(item));
      items_.clear();
      entries_.clear();
      payload_.clear();
      gradient_bytes_ = 0;
      pull_bytes_ = 0;
      for (auto& [id, b] : sent_)
        for (size_t i = 0; i < b.items.size(); ++i)
          if (!b.answered[i]) fail.push_back(std::move(b.items[i]));
      sent_.clear();
      for (auto& [ref, q] : deferred_)
        for (auto& d : q) fail.push_back(std::move(d.item));
      deferred_.clear();
      inflight_.clear();
    }
    for (auto& item : fail) {
      if (resend && keep_) {
        resend(std::move(item));
      } else {
        item.op->ChunkDone(why, 0);
      }
    }
  }

 private:
  struct Sent {
    std::vector<Item> items;
    std::vector<bool> answered;
    size_t remaining = 0;
  };

  bool AddLocked(Item item, const BatchEntry& e, const void* grad, uint64_t fuse_bytes) {
    if (items_.empty()) first_ = std::chrono::steady_clock::now();
    if (e.push) {
      const auto* g = static_cast<const uint8_t*>(grad);
      payload_.insert(payload_.end(), g, g + e.bytes);
      payload_.resize(payload_.size() + (BatchPadded(e.bytes) - e.bytes), 0);
      gradient_bytes_ += e.bytes;
    }
    if (e.pull) pull_bytes_ += item.ref->layout.data_bytes;
    inflight_[item.ref]++;
    entries_.push_back(e);
    items_.push_back(std::move(item));
    return payload_.size() + pull_bytes_ >= fuse_bytes || items_.size() >= kMaxBatchEntries ||
           pull_bytes_ + kMaxBatchedChunkBytes > kMaxBatchPullBytes;
  }

  void SendLocked(transport::Connection& c, uint32_t worker, std::atomic<uint64_t>* pushed) {
    if (items_.empty()) return;
    const uint64_t id = next_id_++;
    Bytes meta;
    Writer w(&meta);
    w.Put(id);
    BatchRequest req;
    req.worker = worker;
    req.entries = std::move(entries_);
    req.Encode(&w);
    Sent& b = sent_[id];
    b.remaining = items_.size();
    b.answered.assign(items_.size(), false);
    b.items = std::move(items_);
    *pushed += gradient_bytes_;  // the gradients' bytes, as a landing buffer would take them
    // Sent under the lock: batches leave in the order their operations were issued, so a
    // chunk's pushes reach the server in sequence order.
    c.Send(kBatch, std::move(meta), transport::Payload::Own(std::move(payload_)), nullptr);
    items_.clear();
    entries_.clear();
    payload_ = Bytes();
    pull_bytes_ = 0;
    gradient_bytes_ = 0;
  }

  std::mutex mu_;
  std::vector<Item> items_;  // waiting, with their entries and pushed bytes
  std::vector<BatchEntry> entries_;
  Bytes payload_;
  uint64_t gradient_bytes_ = 0;  // in payload_, padding left out
  uint64_t pull_bytes_ = 0;
  std::chrono::steady_clock::time_point first_;  // when the oldest waiting one was added
  bool posted_ = false;                          // a flush is scheduled on the loop
  uint64_t next_id_ = 1;
  std::unordered_map<uint64_t, Sent> sent_;
  struct Deferred {
    Item item;
    BatchEntry entry;
    Bytes grad;
  };
  std::unordered_map<ChunkRef*, std::deque<Deferred>> deferred_;  // sync: pushes too far ahead
  // Per chunk: its operations in the batch or sent and not answered yet (each answer releases).
  std::unordered_map<ChunkRef*, uint32_t> inflight_;
  bool InFlight(ChunkRef* ref) const { return inflight_.count(ref) > 0; }
  Status failed_;
  const bool keep_;
  std::function<void(Item)> resend_;  // replication: where items added after Fail go
};

// Pinned host buffers of one size, reused: what operations on GPU memory stage through.
class PinnedPool {
 public:
  PinnedPool(std::shared_ptr<gpu::Cuda> cuda, size_t bytes)
      : cuda_(std::move(cuda)), bytes_(bytes) {}
  ~PinnedPool() {
    for (void* p : free_) cuda_->HostFree(p);
  }
  Result<void*> Take() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!free_.empty()) {
        void* p = free_.back();
        free_.pop_back();
        return p;
      }
    }
    return cuda_->HostAlloc(bytes_);
  }
  void Give(void* p) {
    if (p == nullptr) return;
    std::lock_guard<std::mutex> lock(mu_);
    free_.push_back(p);
  }

 private:
  std::shared_ptr<gpu::Cuda> cuda_;
  const size_t bytes_;
  std::mutex mu_;
  std::vector<void*> free_;
};

struct TensorInfo {
  // The step of the tensor's next push: every chunk's push carries it as its sequence number.
  // A push found late (sync with a quorum) moves it past the version published on every chunk.
  std::atomic<uint64_t> next_step{1};
  std::string name;
  uint64_t numel = 0;
  Compression compression;
  Codec pull_codec = Codec::kNone;
  std::vector<std::unique_ptr<ChunkRef>> chunks;
  // Compressed pushes: the staging buffers and, with error feedback, what the codec lost so
  // far (numel floats; touched only by the thread that issues the tensor's operations).
  std::shared_ptr<StagingPool> staging;
  uint64_t encoded_bytes = 0;
  std::vector<float> residual;
  uint64_t pushes =
      0;  // pushes issued (a topk warm-up's clock); the issuing thread only
          // Its name escaped for JSON, for the timeline (set when declared with a timeline on).
  std::shared_ptr<const std::string> escaped_name;
  // Operations started on it, for the metrics: push, pull, push_pull.
  std::array<std::atomic<uint64_t>, 3> ops{};
  // The learning rate its pushes carry (SetLearningRate); none: the declared one. The issuing
  // thread only.
  std::optional<float> lr;
  // Node-level reduction: the element ranges of the chunks this worker pushes for its node, and
  // the node operations (push, push_pull) issued on it (the issuing thread only).
  std::vector<std::pair<uint64_t, uint64_t>> mine;
  uint64_t node_ops = 0;
  // Operations on GPU memory: pinned host buffers of numel floats (created by the issuing
  // thread when first needed).
  std::shared_ptr<PinnedPool> pinned;
};

// Reads the newest published version of a chunk into `dst`, seqlock style. An attempt reads
// slot s whose tag T was observed before the attempt began: the floats (with the other slot's
// tag, in parallel), then s's tag again. The server zeroes a slot's tag before it changes any
// byte of the slot and sets the new tag after the last, so if the tag read afterwards is
// still T, no byte read belongs to another version. A newer tag in the other slot, or a
// changed tag, starts another attempt on the newest slot seen. No hash over the floats. Where
// the transport carries one-sided reads out in issue order (tcp), the three reads of an
// attempt go at once: one round trip.
struct PullJob : std::enable_shared_from_this<PullJob> {
  std::shared_ptr<RpcChannel> rpc;
  ChunkRef* chunk;
  const ChunkSlots* slots = nullptr;  // the chunk's slots on rpc's server
  float* dst;
  std::atomic<uint64_t>* bytes_pulled = nullptr;
  bool in_order = false;         // the transport serves one-sided reads in issue order
  std::vector<uint8_t> encoded;  // a pull codec's bytes, expanded into dst once consistent
  std::shared_ptr<OpState> op;
  uint64_t expect = 0;     // tag of the slot being read, as observed before this attempt
  uint64_t other_tag = 0;  // the other slot's tag, read beside the floats
  uint64_t tag_after = 0;  // the slot's tag, read after the floats
  int attempt = 0;
  std::atomic<int> pending{0};
  Status read_error;
  std::mutex mu;
  // A read that failed (its server's connection lost: the worker may retry on the chunk's
  // backup); null: the operation fails.
  std::function<void(Status)> failed;

  void Fail(const Status& st) {
    if (failed) return failed(st);
    op->ChunkDone(st, 0);
  }

  void Start() {
    expect = chunk->known_version.load() + 1;  // published: its tag was seen, or acknowledged
    ReadFloats();
  }

  uint64_t TagOffset(uint64_t slot) const {
    return slot * chunk->layout.stride + chunk->layout.trailer_offset;
  }

  // Completion of one of `n` parallel reads; the last one runs `next`.
  std::function<void(Status)> Joined(void (PullJob::*next)()) {
    auto self = shared_from_this();
    return [self, next](Status st) {
      if (!st.ok()) {
        std::lock_guard<std::mutex> lock(self->mu);
        if (self->read_error.ok()) self->read_error = st;
      }
      if (--self->pending == 0) {
        if (!self->read_error.ok()) return self->Fail(self->read_error);
        ((*self).*next)();
      }
    };
  }

  // Where the transport carries reads out in the order they were issued (in_order: tcp), the
  // slot's tag is read again in the same round trip, by a read issued after the floats'.
  void ReadFloats() {
    uint64_t slot = (expect - 1) % 2;
    pending = in_order ? 3 : 2;
    Connection& c = rpc->connection();
    void* into = dst;
    if (chunk->pull_codec != Codec::kNone) {
      encoded.resize(chunk->layout.data_bytes);
      into = encoded.data();
    }
    if (bytes_pulled) *bytes_pulled += chunk->layout.data_bytes;
    void (PullJob::*next)() = in_order ? &PullJob::CheckAll : &PullJob::ReadTagAfter;
    c.Read(into, chunk->layout.data_bytes, slots->key, slot * chunk->layout.stride, Joined(next));
    c.Read(&other_tag, sizeof(other_tag), slots->key, TagOffset(1 - slot), Joined(next));
    if (in_order) c.Read(&tag_after, sizeof(tag_after), slots->key, TagOffset(slot), Joined(next));
  }

  void CheckAll() {
    if (other_tag > expect) return Retry(other_tag);  // a newer version: a pull returns it
    Check();
  }

  void ReadTagAfter() {
    if (other_tag > expect) return Retry(other_tag);  // a newer version: a pull returns it
    pending = 1;
    rpc->connection().Read(&tag_after, sizeof(tag_after), slots->key, TagOffset((expect - 1) % 2),
                           Joined(&PullJob::Check));
  }

  void Check() {
    if (tag_after == expect) {
      uint64_t v = expect - 1;
      if (chunk->pull_codec != Codec::kNone)
        compress::DecodeParams(chunk->pull_codec, encoded.data(), chunk->numel, dst);
      RaiseTo(chunk->known_version, v);
      RaiseTo(chunk->pulled_version, v);
      return op->ChunkDone(Status::OK(), v);
    }
    // The slot is being rewritten (tag 0: the newest version is then in the other slot) or
    // holds a newer version already.
    Retry(tag_after != 0 ? tag_after : other_tag);
  }

  // Another attempt, on the slot of `seen` when it is newer than what was expected (a tag seen
  // now was published before the next attempt starts). A slot found rewritten with nothing
  // newer seen yet is read again after re-reading both tags.
  void Retry(uint64_t seen) {
    if (++attempt >= kMaxReadAttempts)
      return op->ChunkDone(Status::Internal(fmt::format(
                               "could not read a consistent version of chunk {} in {} attempts",
                               chunk->chunk_id, attempt)),
                           0);
    if (seen > expect) {
      expect = seen;
      return ReadFloats();
    }
    pending = 2;
    Connection& c = rpc->connection();
    c.Read(&tag_after, sizeof(tag_after), slots->key, TagOffset(0), Joined(&PullJob::PickNewest));
    c.Read(&other_tag, sizeof(other_tag), slots->key, TagOffset(1), Joined(&PullJob::PickNewest));
  }

  // After re-reading both tags (slot 0's in tag_after, slot 1's in other_tag).
  void PickNewest() {
    uint64_t newest = std::max(tag_after, other_tag);
    // Both slots stable and older than expected: the chunk moved to its backup, which had not
    // published the version this worker saw on the primary yet. Its newest is what there is.
    if (newest >= expect || (newest != 0 && std::min(tag_after, other_tag) != 0)) {
      expect = newest;
      return ReadFloats();
    }
    // Both slots in flux or older than expected (cannot last): look again.
    Retry(0);
  }
};

class WorkerImpl final : public Worker {
 public:
  explicit WorkerImpl(WorkerOptions o) : opt_(std::move(o)) {}

  // Tests: the destructor then ends the worker as a crash would, without a goodbye.
  void SkipGoodbye() { finished_ = true; }
  // Fault injection (worker/testing.h): runs before each create message of a Declare, with the
  // server it goes to; set before the worker declares.
  void BeforeCreate(std::function<void(uint32_t)> hook) { create_hook_ = std::move(hook); }

  ~WorkerImpl() override {
    if (node_thread_.joinable()) {
      {
        std::lock_guard<std::mutex> lock(node_mu_);
        node_stop_ = true;
      }
      reducer_->Ring();
      node_thread_.join();
    }
    if (fuse_thread_.joinable()) {
      {
        std::lock_guard<std::mutex> lock(fuse_mu_);
        fuse_stop_ = true;
      }
      fuse_cv_.notify_all();
      fuse_thread_.join();
    }
    if (failover_thread_.joinable()) {
      {
        std::lock_guard<std::mutex> lock(failover_->mu);
        failover_->stop = true;
      }
      failover_->cv.notify_all();
      failover_thread_.join();
    }
    metrics_.Stop();
    WriteTimeline();
    // A worker that ends without Finish() but in a healthy job still says goodbye, so that
    // returning from main() is a clean exit; a crash (no destructor) is a failure.
    if (node_ && !finished_ && node_->failure().ok()) {
      Status st = node_->Goodbye();
      if (!st.ok()) spdlog::warn("worker {}: goodbye failed: {}", rank_, st.ToString());
    }
    node_.reset();
    for (auto& s : servers_)
      if (s) s->connection().Close();
    std::thread lead;
    {
      std::lock_guard<std::mutex> lock(lead_mu_);
      lead_closing_ = true;
      lead = std::move(lead_thread_);
    }
    if (lead.joinable()) lead.join();      // its calls fail with the connections
    transport::DestroyInPlace(data_ctx_);  // its loop thread reads data_ctx_ until joined
    control_ctx_.reset();
  }

  Status Init() {
    transport::ContextOptions co;
    SHARDPS_RETURN_IF_ERROR(transport::SecureRole(
        opt_.secret_file, {opt_.tls_cert, opt_.tls_key, opt_.tls_ca}, "worker", &co));
    co.name = "worker-ctl";
    co.connection_inbound_bytes = opt_.connection_inbound_bytes;
    co.inbound_budget = std::make_shared<transport::InboundBudget>(opt_.process_inbound_bytes);
    auto cctx = transport::CreateContext("tcp", co);
    if (!cctx.ok()) return cctx.status();
    control_ctx_ = std::move(cctx).value();
    NodeClientOptions no;
    no.coordinator = opt_.coordinator;
    no.role = Role::kWorker;
    no.rank = opt_.rank;
    no.transport = opt_.transport;
    no.node = opt_.node;
    no.local_rank = opt_.local_rank;
    no.local_size = opt_.local_size;
    no.connect_timeout = opt_.connect_timeout;
    no.register_timeout = opt_.register_timeout;
    no.rpc_timeout = opt_.rpc_timeout;
    no.on_server_down = [this](const ServerDown& d) { OnServerDown(d); };
    no.on_backups_added = [this](const BackupOrders& o) { OnBackupsAdded(o); };
    no.on_server_joined = [fo = failover_](const ServerJoined& j,
                                           std::function<void(const ServerReached&)> report) {
      // Connected to by FailoverWatch (Connect blocks; this is the control loop).
      std::lock_guard<std::mutex> lock(fo->mu);
      fo->joined.push_back({j, std::move(report)});
      fo->cv.notify_all();
    };
    no.on_checkpoint_gate = [this](const CheckpointGate& g) { return CloseGate(g); };
    no.on_checkpoint_cuts = [this](const CheckpointCuts& k,
                                   std::function<void(const CheckpointDone&)> report) {
      OnCheckpointCuts(k, std::move(report));
    };
    no.on_checkpoint_release = [this](const CheckpointGate& g) { OpenGate(g.id, nullptr); };
    auto servers_failed = failed_servers_;
    auto failover = failover_;
    auto gate = gate_;
    auto node = NodeClient::Connect(control_ctx_.get(), no,
                                    [servers_failed, failover, gate](Status why, bool) {
                                      // Pushes held by a checkpoint go on, to fail with the job.
                                      {
                                        std::lock_guard<std::mutex> lock(gate->mu);
                                        gate->OpenLocked();
                                      }
                                      gate->cv.notify_all();
                                      // The job failed: fail every outstanding server call so that
                                      // waits return promptly.
                                      {
                                        std::lock_guard<std::mutex> lock(servers_failed->mu);
                                        servers_failed->why = why;
                                        for (auto& rpc : servers_failed->rpcs)
                                          if (auto r = rpc.lock()) r->FailAll(why);
                                        for (auto& b : servers_failed->batchers)
                                          if (auto bb = b.lock()) bb->Fail(why);
                                      }
                                      // Operations waiting for a failover fail with it too.
                                      failover->FailAll(why);
                                    });
    if (!node.ok()) return node.status();
    node_ = std::move(node).value();
    view_ = node_->info().view;
    rank_ = node_->info().rank;
    rejoined_ = node_->info().rejoined;
    if (rejoined_)
      spdlog::info("worker {}: rejoins the job in the place of the worker that was removed", rank_);

    co.name = "worker-data";
    co.busy_poll = opt_.busy_poll;
    co.backend_settings = opt_.transport_settings;
    auto dctx = transport::CreateContext(opt_.transport, co);
    if (!dctx.ok()) return dctx.status();
    data_ctx_ = std::move(dctx).value();
    if (view_.servers.size() > kMaxServers)
      return Status::ProtocolError(fmt::format("the job has {} servers", view_.servers.size()));
    // A worker that rejoins a job that lost servers: those are not reached (their chunks are on
    // their backups, where its declares find them).
    const std::vector<uint32_t>& dead_at_start = node_->info().dead_servers;
    for (uint32_t s = 0; s < view_.servers.size(); ++s)
      if (std::find(dead_at_start.begin(), dead_at_start.end(), s) == dead_at_start.end())
        SHARDPS_RETURN_IF_ERROR(ConnectServer(s, view_.servers[s].address, opt_.connect_timeout));
    if (!opt_.timeline.empty())
      meters_->timeline = std::make_shared<metrics::Timeline>(
          opt_.timeline, fmt::format("worker {}", rank_), 1000 + rank_);
    auto m = metrics::RoleMetrics::Start(opt_.metrics_listen, "worker", rank_,
                                         [this](metrics::Families& f) { Collect(f); });
    if (!m.ok()) return m.status();
    metrics_ = std::move(m).value();
    metrics_.MarkReady();
    if (opt_.fuse_delay.count() > 0) fuse_thread_ = std::thread([this] { FuseLoop(); });
    if (view_.replicas > 0) {
      {
        std::lock_guard<std::mutex> lock(failover_->mu);
        failover_->dead.resize(
            std::max<size_t>({failover_->dead.size(), view_.num_servers, view_.servers.size()}),
            false);
        for (uint32_t s : dead_at_start) failover_->dead[s] = true;
        failover_->replicated = true;
      }
      failover_thread_ = std::thread([this] { FailoverWatch(); });
    }
    {
      // A server declared dead while this worker was starting: its connection closes now.
      std::vector<uint32_t> dead;
      {
        std::lock_guard<std::mutex> lock(failover_->mu);
        failover_->ready = true;
        for (uint32_t s = 0; s < NumServers(); ++s)
          if (failover_->Dead(s)) dead.push_back(s);
      }
      for (uint32_t s : dead)
        if (servers_[s]) servers_[s]->connection().Close();
    }
    {
      // Checkpoints of the running job may hold its pushes from now on (CloseGate).
      std::lock_guard<std::mutex> lock(gate_->mu);
      gate_->rank = rank_;
      gate_->ready = true;
    }
    if (auto c = gpu::Cuda::Load(); c.ok()) {
      cuda_ = std::move(c).value();
      spdlog::info("worker {}: {} GPU(s) visible: tensors in GPU memory are pushed and pulled",
                   rank_, cuda_->device_count());
    } else {
      spdlog::debug("worker {}: {}", rank_, c.status().ToString());
    }
    if (opt_.local_size > 1) {
      if (view_.worker_nodes.empty())
        return Status::Internal("the coordinator did not group the workers into nodes");
      const uint32_t node = view_.worker_nodes[rank_];
      const auto local = static_cast<uint32_t>(opt_.local_rank);
      // NCCL where asked for, or (auto) where CUDA and NCCL load and every worker of the node has
      // a GPU (NotFound says otherwise before anything is shared); else shared memory. Every
      // worker of a node must choose the same: the set-up fails for all otherwise.
      Result<std::unique_ptr<NodeReducer>> r = Status::NotFound("shared memory asked for");
      if (opt_.node_reducer != "shm")
        r = CreateNcclNodeReducer(view_.job_id, node, local, opt_.local_size, cuda_,
                                  opt_.rpc_timeout);
      if (!r.ok() && r.status().IsNotFound() && opt_.node_reducer != "nccl") {
        spdlog::debug("worker {}: no NCCL node reducer: {}", rank_, r.status().ToString());
        r = CreateShmNodeReducer(view_.job_id, node, local, opt_.local_size, opt_.rpc_timeout);
      }
      if (!r.ok()) return r.status().WithContext("node-level reduction");
      reducer_ = std::move(r).value();
      node_load_.assign(opt_.local_size, 0);
      node_thread_ = std::thread([this] { NodeLoop(); });
      spdlog::info(
          "worker {}: local rank {} of the {} workers of node {} ('{}'), reducing "
          "through {}",
          rank_, opt_.local_rank, opt_.local_size, view_.worker_nodes[rank_],
          opt_.node.empty() ? "this host" : opt_.node, reducer_->name());
    }
    return Status::OK();
  }

  void WriteTimeline() {
    if (!meters_->timeline) return;
    Status st = meters_->timeline->Write();
    if (!st.ok()) spdlog::error("worker {}: {}", rank_, st.ToString());
  }

  // Chunks of this worker's tensors without a live backup it attached to (WorkerStats).
  uint64_t UnbackedChunks() const {
    std::lock_guard<std::mutex> tl(tensors_mu_);
    std::lock_guard<std::mutex> lock(failover_->mu);
    if (!failover_->replicated) return 0;
    uint64_t n = 0;
    for (const auto& t : tensors_)
      for (const auto& c : t->chunks) {
        const uint32_t b = c->backup.load();
        if (b == kNoServer || failover_->Dead(b)) ++n;
      }
    return n;
  }

  // The metrics of a scrape (docs/metrics.md).
  void Collect(metrics::Families& f) {
    auto d = [](uint64_t v) { return static_cast<double>(v); };
    f.Counter("shardps_worker_push_bytes_total", "gradient bytes written to the servers (encoded)",
              d(bytes_pushed_.load()));
    f.Counter("shardps_worker_pull_bytes_total", "parameter bytes read from the servers",
              d(bytes_pulled_.load()));
    f.Counter("shardps_worker_late_pushes_total", "chunk pushes dropped as late (backup workers)",
              d(late_pushes_.load()));
    f.Gauge("shardps_worker_unbacked_chunks",
            "chunks of this worker's tensors without a live backup it is attached to (replicas)",
            d(UnbackedChunks()));
    f.Gauge("shardps_worker_operations_in_flight", "push, pull and push_pull not completed",
            static_cast<double>(meters_->in_flight.load()));
    f.Histogram("shardps_worker_operation_seconds", "time from start to completion", meters_->push,
                {{"op", "push"}});
    f.Histogram("shardps_worker_operation_seconds", "time from start to completion", meters_->pull,
                {{"op", "pull"}});
    f.Histogram("shardps_worker_operation_seconds", "time from start to completion",
                meters_->push_pull, {{"op", "push_pull"}});
    {
      std::lock_guard<std::mutex> lock(tensors_mu_);
      f.Gauge("shardps_worker_tensors", "tensors declared", d(tensors_.size()));
      static constexpr const char* kOps[] = {"push", "pull", "push_pull"};
      for (const auto& t : tensors_)
        for (int k = 0; k < 3; ++k)
          f.Counter("shardps_worker_tensor_operations_total", "operations started, by tensor",
                    d(t->ops[k].load(std::memory_order_relaxed)),
                    {{"tensor", t->name}, {"op", kOps[k]}});
    }
    f.Counter("shardps_refused_peers_total",
              "connections refused for not proving the cluster secret",
              d((data_ctx_ ? data_ctx_->refused_peers() : 0) +
                (control_ctx_ ? control_ctx_->refused_peers() : 0)));
    if (node_)
      f.Counter("shardps_heartbeats_sent_total", "heartbeats sent to the coordinator",
                d(node_->heartbeats_sent()));
  }

  uint32_t rank() const override { return rank_; }
  bool rejoined() const override { return rejoined_; }
  uint32_t num_workers() const override { return view_.num_workers; }
  uint32_t num_servers() const override { return NumServers(); }
  // The servers connected to, by rank (those that joined the running job included).
  uint32_t NumServers() const { return num_servers_.load(); }
  Mode mode() const override { return view_.mode; }
  uint32_t staleness() const override { return view_.staleness; }
  uint32_t sync_quorum() const override { return view_.sync_quorum; }

  uint64_t numel(TensorId id) const override {
    std::lock_guard<std::mutex> lock(tensors_mu_);
    return id < tensors_.size() ? tensors_[id]->numel : 0;
  }

  uint64_t steps(TensorId id) const override {
    std::lock_guard<std::mutex> lock(tensors_mu_);
    return id < tensors_.size() ? tensors_[id]->next_step.load() - 1 : 0;
  }

  Result<std::vector<TensorId>> Declare(const std::vector<TensorSpec>& specs) override {
    // With node-level reduction every worker of the node adds its declarations to the
    // reducer in the same order: one Declare at a time.
    std::unique_lock<std::mutex> declaring(declare_mu_, std::defer_lock);
    if (reducer_) declaring.lock();
    std::vector<DeclareItem> items;
    std::set<std::string> names;
    for (const auto& s : specs) {
      if (s.name.empty()) return Status::InvalidArgument("a tensor needs a name");
      if (s.numel() == 0)
        return Status::InvalidArgument(fmt::format("tensor '{}' has an invalid shape", s.name));
      SHARDPS_RETURN_IF_ERROR(s.optimizer.Validate().WithContext("tensor '" + s.name + "'"));
      SHARDPS_RETURN_IF_ERROR(s.compression.Validate().WithContext("tensor '" + s.name + "'"));
      {
        // A push is written into a landing buffer (chunk_bytes) before the server can check
        // it; encodings grow with the chunk, so the largest chunk decides.
        const uint64_t largest = std::min<uint64_t>(s.numel(), view_.chunk_bytes / 4);
        const Compression& c = s.compression;
        const uint64_t bytes = compress::EncodedBytes(
            compress::ForChunk(c.AtPush(s.numel(), 0), largest, 0, largest), largest);
        if (c.codec != Codec::kNone && largest >= c.min_numel && bytes > view_.chunk_bytes)
          return Status::InvalidArgument(fmt::format(
              "tensor '{}': compression {} encodes a chunk of {} elements in {} bytes, more "
              "than the {} bytes of a landing buffer (use a larger block)",
              s.name, c.ToString(), largest, bytes, view_.chunk_bytes));
      }
      if (!compress::IsPullCodec(s.pull_codec))
        return Status::InvalidArgument(
            fmt::format("tensor '{}': parameters are pulled as none, fp16 or bf16, not {}", s.name,
                        CodecName(s.pull_codec)));
      if (!names.insert(s.name).second)
        return Status::InvalidArgument(fmt::format("tensor '{}' is declared twice", s.name));
      {
        std::lock_guard<std::mutex> lock(tensors_mu_);
        if (by_name_.count(s.name))
          return Status::AlreadyExists(fmt::format("tensor '{}' was already declared", s.name));
      }
      items.push_back(DeclareItem{s.name, s.numel()});
    }
    auto placements = node_->Declare(items);
    if (!placements.ok()) return placements.status();

    // Create the chunks on their servers (idempotent: the first creation wins).
    std::vector<std::unique_ptr<TensorInfo>> infos;
    // One create message per server and batch: a batch carries at most kCreateBatchBytes of
    // initial values (or one chunk) and kCreateBatchItems chunks, so that it stays well within
    // the server's inbound budget however large the model.
    struct Batch {
      Bytes body;
      uint32_t count = 0;
      Bytes init;
      std::vector<ChunkRef*> refs;
      std::vector<bool> backup;  // per ref: this is its backup's copy
    };
    const uint32_t num_servers = NumServers();
    std::vector<std::vector<Batch>> per(num_servers);
    for (size_t i = 0; i < specs.size(); ++i) {
      auto info = std::make_unique<TensorInfo>();
      info->name = specs[i].name;
      if (meters_->timeline)
        info->escaped_name = std::make_shared<const std::string>(metrics::JsonEscape(info->name));
      info->numel = items[i].numel;
      info->compression = specs[i].compression;
      if (info->numel < info->compression.min_numel) info->compression = Compression{};
      info->pull_codec = specs[i].pull_codec;
      for (const auto& p : (*placements)[i].chunks) {
        auto ref = std::make_unique<ChunkRef>();
        ref->tensor_step = &info->next_step;
        ref->chunk_id = p.chunk_id;
        ref->server = p.server;
        ref->backup.store(p.backup);
        ref->offset = p.offset;
        ref->numel = p.numel;
        ref->codec = compress::ForChunk(info->compression, info->numel, p.offset, p.numel);
        ref->encoded_offset = info->encoded_bytes;
        // The staging space of a chunk is its largest encoding: the first push's, when a
        // topk warm-up sends more at first.
        ref->encoded_bytes = std::max(
            compress::EncodedBytes(ref->codec, p.numel),
            compress::EncodedBytes(compress::ForChunk(info->compression.AtPush(info->numel, 0),
                                                      info->numel, p.offset, p.numel),
                                   p.numel));
        info->encoded_bytes += (ref->encoded_bytes + 63) / 64 * 64;  // each chunk 64-aligned
        ref->pull_codec = specs[i].pull_codec;
        ref->layout = LayoutFor(p.numel, ref->pull_codec);
        // On its primary, and on its backup (replication): the same chunk, both told which
        // they are.
        for (const uint32_t server : {p.server, p.backup}) {
          if (server == kNoServer) continue;
          if (server >= num_servers || !servers_[server])
            return Status::ProtocolError(fmt::format(
                "chunk {} of tensor '{}' was placed on server {}, which this worker has not "
                "reached",
                p.chunk_id, specs[i].name, server));
          auto& batches = per[server];
          if (batches.empty() || batches.back().count >= kCreateBatchItems ||
              (batches.back().count > 0 &&
               batches.back().init.size() + p.numel * 4 > kCreateBatchBytes))
            batches.emplace_back();
          Batch& ps = batches.back();
          CreateChunkItem ci{p.chunk_id,
                             specs[i].name,
                             p.offset,
                             p.numel,
                             specs[i].optimizer,
                             info->compression.codec,
                             info->compression.block,
                             specs[i].pull_codec,
                             p.server,
                             p.backup};
          ref->create = ci;
          Writer w(&ps.body);
          ci.Encode(&w);
          ps.count++;
          if (rank_ == 0) {  // worker 0 brings the initial values; the others attach
            size_t at = ps.init.size();
            ps.init.resize(at + p.numel * 4);
            auto* f = reinterpret_cast<float*>(ps.init.data() + at);
            if (specs[i].init) {
              std::memcpy(f, specs[i].init + p.offset, p.numel * 4);
            } else {
              std::fill(f, f + p.numel, specs[i].init_value);
            }
          }
          ps.refs.push_back(ref.get());
          ps.backup.push_back(server == p.backup);
        }
        info->chunks.push_back(std::move(ref));
      }
      if (info->compression.codec != Codec::kNone) {
        info->staging = std::make_shared<StagingPool>(data_ctx_.get(), info->encoded_bytes);
        if (info->compression.error_feedback) info->residual.assign(info->numel, 0.0f);
      }
      infos.push_back(std::move(info));
    }
    // Servers that died while their chunks were being created (the job keeps backups): those
    // chunks go on with their other copy (LostInDeclare); and what each backup answered, for the
    // chunks whose primary that was.
    std::vector<bool> lost(num_servers, false);
    std::map<ChunkRef*, std::pair<uint64_t, uint64_t>> backup_reply;  // version, next_seq
    for (uint32_t s = 0; s < num_servers; ++s) {
      for (Batch& b : per[s]) {
        Bytes body;
        Writer w(&body);
        w.Put(b.count);
        w.PutRaw(b.body.data(), b.body.size());
        w.Put<int32_t>(static_cast<int32_t>(rank_));
        w.Put<uint32_t>(0);  // no rejoin_from
        if (create_hook_) create_hook_(s);
        // Sent as a message whose payload is the initial values.
        auto rep = CallCreate(*servers_[s], body, std::move(b.init));
        if (!rep.ok() && LostInDeclare(s, rep.status())) {
          lost[s] = true;
          break;
        }
        if (!rep.ok())
          return rep.status().WithContext(fmt::format("creating chunks on server {}", s));
        Reader r(rep->data(), rep->size());
        CreateChunksReply reply;
        if (!reply.Decode(&r) || !r.done() || reply.chunks.size() != b.count)
          return Status::ProtocolError("malformed create reply");
        for (size_t k = 0; k < b.refs.size(); ++k) {
          ChunkRef* ref = b.refs[k];
          const ChunkSlots& got = reply.chunks[k];
          if (got.slot_stride != ref->layout.stride)
            return Status::ProtocolError("malformed create reply");
          if (b.backup[k]) {
            backup_reply[ref] = {got.version, got.next_seq};
          } else {
            Started(*ref, got.version, got.next_seq);
          }
          ref->AddCopy(static_cast<uint32_t>(s), std::move(reply.chunks[k]));
        }
      }
    }
    if (std::find(lost.begin(), lost.end(), true) != lost.end()) {
      // The chunks of a server that died go on with their other copy: a primary's with its
      // backup (which serves it now: the coordinator moved it there), a backup's without one
      // (the coordinator has a new one made, which kBackupsAdded names).
      std::lock_guard<std::mutex> lock(failover_->mu);
      for (auto& info : infos) {
        for (auto& c : info->chunks) {
          const uint32_t b = c->backup.load();
          if (b != kNoServer && lost[b]) c->backup.store(kNoServer);
          if (!lost[c->server.load()]) continue;
          auto got = backup_reply.find(c.get());
          if (b == kNoServer || lost[b] || got == backup_reply.end())
            return Status::Unavailable(fmt::format(
                "chunk {} of tensor '{}': server {} died while it was being created, and no "
                "other server holds it",
                c->chunk_id, info->name, c->server.load()));
          c->server.store(b);
          c->backup.store(kNoServer);
          Started(*c, got->second.first, got->second.second);
        }
      }
    }
    if (rejoined_) SHARDPS_RETURN_IF_ERROR(JoinAtTensorSteps(infos));
    if (reducer_) {
      std::vector<uint64_t> chunk_numels;
      // What was declared, as the node's workers must agree on it: names and chunks.
      std::string declared;
      for (auto& info : infos) {
        declared += info->name;
        declared.push_back('\0');
        for (auto& c : info->chunks) {
          chunk_numels.push_back(c->numel);
          declared += fmt::format("{}:{}:{};", c->chunk_id, c->offset, c->numel);
        }
      }
      const std::vector<uint32_t> owners = SplitChunks(chunk_numels, &node_load_);
      std::vector<NodeTensor> layouts;
      size_t k = 0;
      for (auto& info : infos) {
        NodeTensor& nt = layouts.emplace_back();
        nt.numel = info->numel;
        for (auto& c : info->chunks) {
          c->owner = owners[k++];
          nt.chunks.push_back({c->offset, c->numel, c->owner});
          if (c->owner == reducer_->local_rank())
            info->mine.emplace_back(c->offset, c->offset + c->numel);
        }
      }
      size_t first = 0;
      {
        std::lock_guard<std::mutex> lock(tensors_mu_);
        first = tensors_.size();
      }
      SHARDPS_RETURN_IF_ERROR(reducer_
                                  ->AddTensors(static_cast<uint32_t>(first), layouts,
                                               Checksum(declared.data(), declared.size()),
                                               opt_.rpc_timeout)
                                  .WithContext("node-level reduction"));
    }
    std::vector<TensorId> ids;
    BackupOrders missed;  // new backups announced while these were being declared
    {
      std::lock_guard<std::mutex> lock(tensors_mu_);
      for (auto& info : infos) {
        for (auto& c : info->chunks) {
          auto it = unattached_backups_.find(c->chunk_id);
          if (it == unattached_backups_.end()) continue;
          missed.items.push_back({c->chunk_id, it->second});
          unattached_backups_.erase(it);
        }
        TensorId id = static_cast<TensorId>(tensors_.size());
        by_name_[info->name] = id;
        tensors_.push_back(std::move(info));
        ids.push_back(id);
      }
    }
    if (!missed.items.empty()) OnBackupsAdded(missed);
    return ids;
  }

  Status SetLearningRate(TensorId id, float lr) override {
    SHARDPS_RETURN_IF_ERROR(CheckLearningRate(lr));
    std::lock_guard<std::mutex> lock(tensors_mu_);
    if (id >= tensors_.size()) return Status::NotFound(fmt::format("unknown tensor id {}", id));
    tensors_[id]->lr = lr;
    return Status::OK();
  }

  // GPU memory: a node reducer that takes it gets it as it is; otherwise the operation is
  // staged through pinned host memory (Staged).
  Handle Push(TensorId id, const float* grad) override { return Route(id, grad, nullptr); }
  Handle Pull(TensorId id, float* out) override {
    return OnDevice(out) ? Staged(id, nullptr, out, false, true, false) : Start(id, nullptr, out);
  }
  Handle PushPull(TensorId id, const float* grad, float* out) override {
    return Route(id, grad, out);
  }

  Status Barrier(const std::string& name, std::chrono::milliseconds timeout) override {
    return node_->Barrier(name, timeout);
  }

  Status Checkpoint(const std::string& dir, std::chrono::milliseconds timeout) override {
    const uint64_t n = ++checkpoints_;
    // Barrier names are short (at most 256 bytes): the directory is not part of them.
    const std::string name = fmt::format("checkpoint {}", n);
    SHARDPS_RETURN_IF_ERROR(Barrier(name + ": begin", timeout));
    Status st;
    // The servers write into it from working directories of their own: an absolute path.
    const std::string where = std::filesystem::absolute(dir).lexically_normal().string();
    if (rank_ == 0) st = LeadCheckpoint(where, timeout).WithContext(name + " into " + where);
    // Every worker waits for worker 0 to be done: nobody pushes into a checkpoint being written.
    Status end = Barrier(name + ": end", timeout + opt_.rpc_timeout);
    return st.ok() ? end : st;
  }

  // Worker 0's part: each server writes its file of a new generation (the last checkpoint in
  // `dir` stays whole meanwhile), then the manifest lists them, replacing the last one. The
  // servers write at once, within one deadline.
  Status LeadCheckpoint(
      const std::string& dir, std::chrono::milliseconds timeout,
      const std::vector<CheckpointCut>& cuts = {}, std::string* about = nullptr,
      const std::function<Status(const std::function<Status()>&)>& commit = nullptr) {
    // One at a time (the workers' and the coordinator's may meet): each its own generation.
    {
      std::unique_lock<std::mutex> lock(write_mu_);
      if (!write_cv_.wait_for(lock, timeout, [&] { return !writing_; }))
        return Status::Timeout("another checkpoint was being written all along");
      writing_ = true;
    }
    struct Written {  // the next one may go, however this one ends
      WorkerImpl* self;
      ~Written() {
        {
          std::lock_guard<std::mutex> lock(self->write_mu_);
          self->writing_ = false;
        }
        self->write_cv_.notify_all();
      }
    } written{this};
    const uint64_t generation = server::CurrentGeneration(dir) + 1;
    std::vector<server::CheckpointFile> files;
    uint64_t chunks = 0;
    const uint32_t num_servers = NumServers();
    std::vector<std::future<Result<Bytes>>> replies(num_servers);
    std::vector<bool> dead(num_servers, false);
    {
      // A server declared dead holds nothing to save: its chunks' backups serve them.
      std::lock_guard<std::mutex> lock(failover_->mu);
      for (size_t s = 0; s < num_servers; ++s) dead[s] = failover_->Dead(s) || !servers_[s];
    }
    for (size_t s = 0; s < num_servers; ++s) {
      if (dead[s]) continue;
      Bytes body;
      Writer w(&body);
      SaveChunksRequest{.dir = dir,
                        .name = server::ServerFileName(generation, static_cast<uint32_t>(s)),
                        .wait_ms = static_cast<uint32_t>(timeout.count()),
                        .cuts = cuts}
          .Encode(&w);
      replies[s] = std::async(std::launch::async, [this, s, body, timeout] {
        return CallSync(*servers_[s], kSaveChunks, body, timeout,
                        fmt::format("server {} writing its chunks", s));
      });
    }
    for (size_t s = 0; s < num_servers; ++s) {
      if (dead[s]) continue;
      auto rep = replies[s].get();
      if (!rep.ok()) return rep.status();
      Reader r(rep->data(), rep->size());
      server::CheckpointFile f;
      uint64_t count = 0;
      if (!r.GetString(&f.name, 256) || !r.Get(&f.bytes) || !r.Get(&f.crc32c) || !r.Get(&count) ||
          !r.done())
        return Status::ProtocolError("malformed save-chunks reply");
      files.push_back(std::move(f));
      chunks += count;
    }
    nlohmann::json info = {{"job_id", view_.job_id},
                           {"mode", ModeName(view_.mode)},
                           {"servers", num_servers},
                           {"workers", view_.num_workers},
                           {"chunks", chunks}};
    if (!cuts.empty()) info["taken_by"] = "coordinator";
    auto write = [&] { return server::WriteManifest(dir, generation, files, info.dump()); };
    SHARDPS_RETURN_IF_ERROR(commit ? commit(write) : write());
    if (about)
      *about = fmt::format("generation {} in {}: {} chunks from {} servers", generation, dir,
                           chunks, files.size());
    return Status::OK();
  }

  // Checkpoints of the running job (docs/fault-tolerance.md, "Checkpoints of a running job").
  // kCheckpointGate: from now on new pushes wait (IssueStep); the answer says, for each tensor,
  // the sequence number of the last push issued before.
  CheckpointCounts CloseGate(const CheckpointGate& g) {
    CheckpointCounts cc;
    cc.id = g.id;
    {
      // A worker still starting has no tensors: it answers none, and holds what it pushes later.
      std::lock_guard<std::mutex> lock(gate_->mu);
      gate_->id = g.id;
      gate_->cut = false;
      gate_->bound.clear();
      // Held no longer than the checkpoint may take, and the release's way here.
      gate_->until = std::chrono::steady_clock::now() + std::chrono::milliseconds(g.timeout_ms) +
                     opt_.rpc_timeout;
    }
    gate_->gated.store(true);
    // A push that took its number before it saw the gate is counted: wait for those.
    while (issuing_.load() != 0) std::this_thread::yield();
    std::lock_guard<std::mutex> lock(tensors_mu_);
    for (const auto& t : tensors_) cc.tensors.emplace_back(t->name, t->next_step.load() - 1);
    return cc;
  }

  // kCheckpointCuts: pushes up to this worker's bound go; worker 0 writes the checkpoint.
  void OnCheckpointCuts(const CheckpointCuts& k,
                        std::function<void(const CheckpointDone&)> report) {
    bool lead = false;
    {
      std::lock_guard<std::mutex> lock(gate_->mu);
      if (gate_->id != k.id) return;  // over already, or not this worker's
      for (const auto& c : k.cuts) gate_->bound[c.tensor] = c.Bound(k.mode, gate_->rank);
      gate_->cut = true;
      gate_->until = std::chrono::steady_clock::now() + std::chrono::milliseconds(k.timeout_ms) +
                     opt_.rpc_timeout;
      lead = gate_->ready && gate_->rank == 0;
    }
    gate_->cv.notify_all();
    if (!lead) return;
    std::lock_guard<std::mutex> lock(lead_mu_);
    if (lead_closing_) return;  // being destroyed
    if (leading_.exchange(true)) {
      report({k.id, Status::AlreadyExists("worker 0 is still writing the last checkpoint"), {}});
      return;
    }
    if (lead_thread_.joinable()) lead_thread_.join();  // the last one, done
    lead_thread_ = std::thread([this, k, report = std::move(report)] {
      std::string about;
      // The manifest is written while the pushes are held, never once they were let go (the
      // checkpoint given up): the release waits for it, and the coordinator for this report.
      auto commit = [this, id = k.id](const std::function<Status()>& write) {
        std::lock_guard<std::mutex> l(gate_->mu);
        if (gate_->id != id)
          return Status::Aborted("the checkpoint was given up before its manifest was written");
        return write();
      };
      Status st =
          LeadCheckpoint(k.dir, std::chrono::milliseconds(k.timeout_ms), k.cuts, &about, commit);
      report({k.id, st, about});
      leading_.store(false);
    });
  }

  // kCheckpointRelease (or the hold's time is up: `why`): held pushes go.
  void OpenGate(uint64_t id, const char* why) {
    {
      std::lock_guard<std::mutex> lock(gate_->mu);
      if (gate_->id != id || id == 0) return;
      if (why) spdlog::warn("worker {}: checkpoint {}: {}; pushes go on", gate_->rank, id, why);
      gate_->OpenLocked();
    }
    gate_->cv.notify_all();
  }

  // The sequence number of a new push of `t`: held while a checkpoint of the running job is
  // taken, unless its cut holds it.
  uint64_t IssueStep(TensorInfo& t) {
    issuing_.fetch_add(1);
    if (!gate_->gated.load()) {
      const uint64_t step = t.next_step.fetch_add(1);
      issuing_.fetch_sub(1);
      return step;
    }
    issuing_.fetch_sub(1);
    std::unique_lock<std::mutex> lock(gate_->mu);
    while (gate_->id != 0) {
      if (gate_->cut) {
        auto it = gate_->bound.find(t.name);
        if (it != gate_->bound.end() && t.next_step.load() <= it->second) break;
      }
      if (gate_->cv.wait_until(lock, gate_->until) == std::cv_status::timeout &&
          std::chrono::steady_clock::now() >= gate_->until) {
        const uint64_t id = gate_->id;
        lock.unlock();
        OpenGate(id, "no release came in time");
        lock.lock();
      }
    }
    return t.next_step.fetch_add(1);
  }

  Result<std::string> ServerStats(uint32_t server) override {
    if (server >= NumServers()) return Status::InvalidArgument(fmt::format("no server {}", server));
    if (!servers_[server])  // one that joined the job and could not be reached
      return Status::Unavailable(fmt::format("server {} was never reached", server));
    {
      std::lock_guard<std::mutex> lock(failover_->mu);
      if (failover_->Dead(server))
        return Status::Unavailable(fmt::format(
            "server {} was declared dead: its chunks are served by their backups", server));
    }
    auto rep = CallSync(*servers_[server], kStats, {}, opt_.rpc_timeout, "server stats");
    if (!rep.ok()) return rep.status();
    Reader r(rep->data(), rep->size());
    std::string json;
    if (!r.GetString(&json)) return Status::ProtocolError("malformed stats reply");
    return json;
  }

  Status Finish() override {
    if (finished_.exchange(true)) return Status::OK();
    WriteTimeline();
    return node_->Goodbye();
  }
  Status failure() const override { return node_->failure(); }

  std::string metrics_address() const override { return metrics_.address(); }
  WorkerStats stats() const override {
    WorkerStats st;
    st.bytes_pushed = bytes_pushed_.load();
    st.bytes_pulled = bytes_pulled_.load();
    st.late_pushes = late_pushes_.load();
    st.unbacked_chunks = UnbackedChunks();
    return st;
  }

 private:
  struct FailedServers {
    std::mutex mu;
    Status why;
    std::vector<std::weak_ptr<RpcChannel>> rpcs;
    std::vector<std::weak_ptr<Batcher>> batchers;
  };

  // Replication (docs/fault-tolerance.md): the servers the coordinator declared dead, and the
  // chunk operations that lost their server's connection and wait to go to the chunk's backup.
  struct Failover {
    std::mutex mu;
    std::condition_variable cv;
    bool stop = false;        // the worker is being destroyed
    bool replicated = false;  // the job keeps backups
    bool ready = false;       // Init connected to every server (servers_, credits_ complete)
    std::vector<bool> dead;   // by server rank
    Status failed;            // the job failed
    struct Waiting {
      uint32_t server = 0;
      std::chrono::steady_clock::time_point deadline;
      Status why;
      std::shared_ptr<OpState> op;
      ChunkRef* ref = nullptr;
      std::function<void()> again;
    };
    std::vector<Waiting> waiting;
    // Servers that joined the running job, for FailoverWatch to connect to (kServerJoined).
    struct Joined {
      ServerJoined server;
      std::function<void(const ServerReached&)> report;
    };
    std::vector<Joined> joined;
    bool Dead(uint32_t s) const { return s < dead.size() && dead[s]; }
    // Under mu: `w` waits (for a server's replacement, or a new backup's attach) until `wait`
    // from now.
    void Queue(Waiting w, std::chrono::milliseconds wait) {
      w.deadline = std::chrono::steady_clock::now() + wait;
      waiting.push_back(std::move(w));
      cv.notify_all();
    }
    // Under mu: the waiting operations `pick` chooses, taken out.
    template <typename Pick>
    std::vector<Waiting> Take(Pick pick) {
      std::vector<Waiting> out;
      for (auto it = waiting.begin(); it != waiting.end();) {
        if (pick(*it)) {
          out.push_back(std::move(*it));
          it = waiting.erase(it);
        } else {
          ++it;
        }
      }
      return out;
    }
    void FailAll(const Status& why) {
      std::vector<Waiting> w;
      {
        std::lock_guard<std::mutex> lock(mu);
        if (failed.ok()) failed = why;
        w.swap(waiting);
      }
      for (auto& x : w) x.op->ChunkDone(why, 0);
    }
  };

  // A chunk operation on `ref` failed with `why` on server `server`. When that server's
  // connection was lost and the job keeps backups, it runs `again` once the coordinator
  // declared the server dead and `ref` moved to its backup (the pushes carry their sequence
  // numbers: one the dead server had passed on is applied once); within twice the heartbeat
  // timeout and a second, or it fails. Otherwise `op` fails now.
  void AfterFailover(uint32_t server, const Status& why, const std::shared_ptr<OpState>& op,
                     ChunkRef* ref, std::function<void()> again) {
    Status fail = why;
    {
      std::unique_lock<std::mutex> lock(failover_->mu);
      if (failover_->replicated && !failover_->stop &&
          (MayBeLost(server, why) || failover_->Dead(server))) {
        if (!failover_->failed.ok()) {
          fail = failover_->failed;
        } else if (failover_->Dead(server) && RerouteLocked(ref)) {
          lock.unlock();
          return again();
        } else if (!failover_->Dead(server) || AttachingLocked(ref)) {
          // Until the server is declared dead, or its new backup's attach is answered.
          failover_->Queue({server, {}, why, op, ref, std::move(again)},
                           std::chrono::milliseconds(FailoverWaitMs()));
          return;
        } else {
          fail = why.WithContext(fmt::format("chunk {} has no live copy left", ref->chunk_id));
        }
      }
    }
    op->ChunkDone(fail, 0);
  }

  // Whether `why`, an operation's failure on `server`, may be the server's death, which the
  // coordinator decides: a transport's failure (the connection closed, a one-sided operation
  // cancelled as the peer vanished, a replaced primary's refusal); an error the server answered
  // (a wrong size, an unknown chunk) is not.
  bool MayBeLost(uint32_t server, const Status& why) const {
    return (server < NumServers() && servers_[server] && servers_[server]->connection().closed()) ||
           why.IsUnavailable() || why.IsRemoteError() || why.IsAborted() ||
           why.code() == Status::Code::kIOError;
  }

  // How long an operation that lost its server waits for the server to be replaced: twice the
  // longer of the timeouts that declare a node dead, and a second.
  uint64_t FailoverWaitMs() const {
    return 2 * uint64_t{std::max(view_.heartbeat_timeout_ms, view_.failover_timeout_ms)} + 1000;
  }

  // Under failover_->mu: moves `ref` to its backup when its server was declared dead; false
  // when it is left on a dead server (no backup, or that died too).
  bool RerouteLocked(ChunkRef* ref) {
    const uint32_t b = ref->backup.load();
    if (failover_->Dead(ref->server.load()) && b != kNoServer && !failover_->Dead(b)) {
      ref->server.store(b);
      ref->backup.store(kNoServer);
    }
    return !failover_->Dead(ref->server.load());
  }

  // kBackupsAdded: chunks that got a new backup after a failover (docs/fault-tolerance.md, "New
  // backups"). The worker attaches to each (its slots there) and from then on moves the chunk
  // to it if its server dies. Control loop; the attach is answered on the data loop.
  void OnBackupsAdded(const BackupOrders& o) {
    for (const auto& it : o.items) {
      ChunkRef* ref = nullptr;
      {
        std::lock_guard<std::mutex> tl(tensors_mu_);
        for (auto& t : tensors_)
          for (auto& c : t->chunks)
            if (c->chunk_id == it.chunk_id) ref = c.get();
        // Not declared here (yet): attached if it is declared later (Declare).
        if (!ref) unattached_backups_[it.chunk_id] = it.backup;
      }
      if (!ref) continue;
      std::shared_ptr<RpcChannel> rpc;
      {
        std::lock_guard<std::mutex> lock(failover_->mu);
        if (!failover_->ready || it.backup >= NumServers() || !servers_[it.backup] ||
            failover_->Dead(it.backup))
          continue;
        rpc = servers_[it.backup];
        ref->attaching.store(it.backup);
      }
      CreateChunkItem ci = ref->create;
      ci.primary = ref->server.load();
      ci.backup = it.backup;
      Bytes body;
      Writer w(&body);
      CreateChunksRequest{{ci}, static_cast<int32_t>(rank_), {}}.Encode(&w);
      const uint64_t id = it.chunk_id;
      rpc->Call(kCreateChunks, body, transport::Payload::Own(Bytes{}),
                [this, fo = failover_, ref, id, b = it.backup](Status st, Reader& r,
                                                               transport::Message&) {
                  CreateChunksReply reply;
                  if (st.ok() && (!reply.Decode(&r) || !r.done() || reply.chunks.size() != 1))
                    st = Status::ProtocolError("malformed create reply");
                  std::unique_lock<std::mutex> lock(fo->mu);
                  if (fo->stop) return;
                  if (st.ok() && reply.chunks[0].slot_stride != ref->layout.stride)
                    st = Status::ProtocolError("malformed create reply");
                  if (st.ok() && !ref->AddCopy(b, std::move(reply.chunks[0])))
                    st = Status::ResourceExhausted(
                        fmt::format("it had {} copies already", ChunkRef::kMaxCopies));
                  if (!st.ok())
                    spdlog::warn("worker {}: cannot use server {} as chunk {}'s new backup: {}",
                                 rank_, b, id, st.ToString());
                  else if (!fo->Dead(b) && ref->server.load() != b)
                    ref->backup.store(b);
                  // Its server died while this attach was under way: it moves there now.
                  if (fo->Dead(ref->server.load())) RerouteLocked(ref);
                  uint32_t expected = b;
                  ref->attaching.compare_exchange_strong(expected, kNoServer);
                  // Operations that found its server dead while this attach was under way.
                  auto run = fo->Take([&](const Failover::Waiting& w) {
                    return w.ref == ref && fo->Dead(w.server);
                  });
                  lock.unlock();
                  RunAfterFailover(run);
                });
    }
  }

  // kServerDown: server `d.rank` was replaced by its chunks' backups. The chunks it served move
  // to them, its connection is closed (its operations in flight fail and come back through
  // AfterFailover), and the operations that waited for this go again.
  void OnServerDown(const ServerDown& d) {
    if (d.rank >= 4096) return;  // the coordinator's bound on servers
    std::vector<Failover::Waiting> run;
    uint32_t moved = 0;
    bool ready = false;
    {
      std::lock_guard<std::mutex> tl(tensors_mu_);
      std::lock_guard<std::mutex> lock(failover_->mu);
      if (d.rank >= failover_->dead.size()) failover_->dead.resize(d.rank + 1, false);
      failover_->dead[d.rank] = true;
      ready = failover_->ready;
      for (auto& t : tensors_)
        for (auto& c : t->chunks)
          if (c->server.load() == d.rank) {
            RerouteLocked(c.get());
            moved++;
          }
      run = failover_->Take([&](const Failover::Waiting& w) { return w.server == d.rank; });
    }
    failover_->cv.notify_all();  // a Declare waiting for it (LostInDeclare)
    spdlog::warn(
        "worker {}: server {} was declared dead (shard map epoch {}): its {} chunks go "
        "to their backups; {} operations are sent again",
        rank_, d.rank, d.epoch, moved, run.size());
    if (!ready) return;  // Init closes it once it connected to every server
    if (d.rank < NumServers() && credits_[d.rank]) {
      Credits& c = *credits_[d.rank];
      std::lock_guard<std::mutex> lock(c.mu);
      c.grants.clear();
    }
    if (d.rank < NumServers() && servers_[d.rank]) servers_[d.rank]->connection().Close();
    RunAfterFailover(run);
  }

  // Operations whose server was declared dead: each goes again on its chunk's copy now, waits
  // for the new backup being attached to, or fails (no live copy left).
  void RunAfterFailover(std::vector<Failover::Waiting>& run) {
    for (auto& w : run) {
      bool ok = false;
      Status fail;
      {
        std::lock_guard<std::mutex> lock(failover_->mu);
        ok = RerouteLocked(w.ref);
        if (!failover_->failed.ok()) {
          fail = failover_->failed;
        } else if (failover_->stop) {
          fail = Status::Aborted("the worker is shutting down");
        } else if (!ok && AttachingLocked(w.ref)) {
          failover_->Queue(std::move(w), std::chrono::milliseconds(FailoverWaitMs()));
          continue;
        }
      }
      if (!fail.ok()) {
        w.op->ChunkDone(fail, 0);
      } else if (ok) {
        w.again();
      } else {
        w.op->ChunkDone(
            w.why.WithContext(fmt::format("chunk {} has no live copy left", w.ref->chunk_id)), 0);
      }
    }
  }

  // Under failover_->mu: whether `ref` is being attached to a new backup that is alive.
  bool AttachingLocked(const ChunkRef* ref) const {
    const uint32_t a = ref->attaching.load();
    return a != kNoServer && !failover_->Dead(a);
  }

  // A server that joined the running job: connected to (an empty string), or why not.
  std::string ReachJoined(const ServerJoined& j) {
    if (j.rank < NumServers() && servers_[j.rank]) return {};  // in the view this worker got
    {
      std::lock_guard<std::mutex> lock(failover_->mu);
      if (failover_->Dead(j.rank)) return fmt::format("server {} was declared dead", j.rank);
    }
    // Bounded well within the coordinator's wait for the join (and this worker's destruction
    // waits for it).
    Status st = ConnectServer(j.rank, j.address,
                              std::min(opt_.connect_timeout, std::chrono::milliseconds(5000)));
    if (!st.ok()) {
      spdlog::warn("worker {}: cannot reach server {}, which joined the job: {}", rank_, j.rank,
                   st.ToString());
      return st.ToString();
    }
    bool dead = false;
    {
      std::lock_guard<std::mutex> lock(failover_->mu);
      dead = failover_->Dead(j.rank);
    }
    if (dead) {
      // Declared dead while this connected (OnServerDown found no connection to close).
      servers_[j.rank]->connection().Close();
      return fmt::format("server {} was declared dead", j.rank);
    }
    spdlog::info("worker {}: server {} joined the job at {}; connected", rank_, j.rank, j.address);
    return {};
  }

  // Connects to server `s` at `address` (its data connection, batcher and credits): at Init, for
  // each server of the view, and for a server that joins the running job (FailoverWatch).
  // Entries are set once, before the count that makes them visible.
  Status ConnectServer(uint32_t s, const std::string& address, std::chrono::milliseconds timeout) {
    auto slot = std::make_shared<std::shared_ptr<RpcChannel>>();
    auto batcher = std::make_shared<Batcher>(view_.replicas > 0);
    transport::ConnectionHandlers h;
    h.on_message = [this, slot, batcher, s](const std::shared_ptr<Connection>& c,
                                            transport::Message m) {
      bool ok = m.tag == kBatchAnswer ? OnBatchAnswer(*batcher, s, m)
                                      : m.tag == kReply && *slot && (*slot)->OnReply(m);
      if (!ok) {
        spdlog::error("unexpected message from server {}; closing", s);
        c->Close();
      }
    };
    h.on_close = [this, slot, batcher, s](const std::shared_ptr<Connection>&, Status st) {
      Status why = Status::Unavailable(
          fmt::format("lost the connection to server {}{}", s, st.ok() ? "" : ": " + st.message()));
      if (*slot) (*slot)->FailAll(why);
      // With replication, its batched operations go to their chunks' backups once the
      // coordinator declared it dead.
      batcher->Fail(why, [this, s, why](Batcher::Item item) {
        auto op = item.op;
        ChunkRef* ref = item.ref;
        AfterFailover(s, why, op, ref, [this, item = std::move(item)] {
          AddToBatch(item.ref->server.load(), item, item.entry,
                     item.grad ? item.grad->data() : nullptr);
        });
      });
    };
    auto conn = data_ctx_->Connect(address, h, timeout);
    if (!conn.ok()) return conn.status().WithContext(fmt::format("connecting to server {}", s));
    *slot = std::make_shared<RpcChannel>(*conn);
    servers_[s] = *slot;
    batchers_[s] = batcher;
    credits_[s] = std::make_unique<Credits>();
    {
      std::lock_guard<std::mutex> lock(failed_servers_->mu);
      failed_servers_->rpcs.push_back(*slot);
      failed_servers_->batchers.push_back(batcher);
      if (!failed_servers_->why.ok()) {
        // The job failed while this connected (a server that joined): as the others.
        (*slot)->FailAll(failed_servers_->why);
        batcher->Fail(failed_servers_->why);
      }
    }
    // Published: readers see the entries below the count (NumServers).
    if (num_servers_.load() < s + 1) num_servers_.store(s + 1);
    return Status::OK();
  }

  // Connects to the servers that joined the running job (kServerJoined) and says so; fails the
  // operations whose server was neither replaced nor back in time.
  void FailoverWatch() {
    std::unique_lock<std::mutex> lock(failover_->mu);
    while (!failover_->stop) {
      if (failover_->joined.empty()) failover_->cv.wait_for(lock, std::chrono::milliseconds(200));
      if (!failover_->joined.empty() && !failover_->stop) {
        auto joined = std::move(failover_->joined);
        failover_->joined.clear();
        lock.unlock();
        for (auto& j : joined) j.report(ServerReached{j.server.rank, ReachJoined(j.server)});
        lock.lock();
        continue;
      }
      const auto now = std::chrono::steady_clock::now();
      auto expired = failover_->Take(
          [&](const Failover::Waiting& w) { return w.deadline <= now || failover_->stop; });
      if (expired.empty()) continue;
      std::vector<std::string> whys;
      for (const auto& w : expired)
        whys.push_back(
            failover_->Dead(w.server)
                ? fmt::format("chunk {} has no live copy left: its new backup was not "
                              "attached to within {} ms",
                              w.ref->chunk_id, FailoverWaitMs())
                : fmt::format("server {} was not declared dead and replaced within {} ms", w.server,
                              FailoverWaitMs()));
      lock.unlock();
      for (size_t i = 0; i < expired.size(); ++i)
        expired[i].op->ChunkDone(expired[i].why.WithContext(whys[i]), 0);
      lock.lock();
    }
  }

  // A worker that rejoined the job (docs/fault-tolerance.md, "A worker that rejoins"): each
  // chunk's primary said at attach where its pushes go on (its engine waits for it from there);
  // each tensor's pushes start at the furthest of its chunks', so that they share its steps.
  // Each primary is told (a second attach: ChunkEngine::JoinAt) and answers where each starts.
  Status JoinAtTensorSteps(std::vector<std::unique_ptr<TensorInfo>>& infos) {
    std::map<uint32_t, std::vector<std::pair<ChunkRef*, uint64_t>>> per;
    for (auto& info : infos) {
      uint64_t top = 0;
      for (auto& c : info->chunks) top = std::max(top, c->rejoin_next);
      if (top == 0) continue;  // declared after this worker rejoined: from the start
      if (info->next_step.load() < top) info->next_step.store(top);
      const uint64_t at = info->next_step.load();
      for (auto& c : info->chunks)
        if (c->rejoin_next != 0) per[c->server.load()].emplace_back(c.get(), at);
    }
    for (auto& [s, refs] : per) {
      CreateChunksRequest rq;
      rq.worker = static_cast<int32_t>(rank_);
      for (auto& [ref, at] : refs) {
        rq.items.push_back(ref->create);
        rq.rejoin_from.push_back(at);
      }
      Bytes body;
      Writer w(&body);
      rq.Encode(&w);
      auto rep = CallCreate(*servers_[s], body, Bytes{});
      if (!rep.ok())
        return rep.status().WithContext(fmt::format("rejoining the chunks of server {}", s));
      Reader r(rep->data(), rep->size());
      CreateChunksReply reply;
      if (!reply.Decode(&r) || !r.done() || reply.chunks.size() != refs.size())
        return Status::ProtocolError("malformed rejoin reply");
      for (size_t k = 0; k < refs.size(); ++k) {
        auto [ref, at] = refs[k];
        const uint64_t next = reply.chunks[k].next_seq;
        // The engine starts it at the step asked for, the furthest of the tensor's chunks (no
        // later push of it is there): the tensor's chunks share its steps.
        if (next != at)
          return Status::ProtocolError(fmt::format(
              "server {} starts this worker's pushes to chunk {} at {}, not the tensor's step {}",
              s, ref->chunk_id, next, at));
        ref->rejoin_next = next;
        RaiseTo(ref->known_version, reply.chunks[k].version);
      }
    }
    return Status::OK();
  }

  // Declare: the server that serves a chunk answered its create (or attach): the chunk's
  // published version, and where this worker's pushes go on (ChunkSlots).
  void Started(ChunkRef& ref, uint64_t version, uint64_t next_seq) {
    ref.known_version = version;
    ref.rejoin_next = next_seq;
    // A chunk restored from a checkpoint (docs/fault-tolerance.md) is at its saved version: in
    // sync mode the tensor's pushes go on with the step after it.
    if (view_.mode == Mode::kSync && ref.tensor_step->load() <= version)
      ref.tensor_step->store(version + 1);
  }

  // Declare: creating chunks on `server` failed with `why`. True when the job keeps backups, the
  // server's connection was lost, and the coordinator declared it dead within the failover wait
  // (FailoverWaitMs): the declare goes on with the chunks' other copies. False: the declare fails
  // with `why`.
  bool LostInDeclare(uint32_t server, const Status& why) {
    // A worker that rejoined learns where its pushes go on from each chunk's primary: its
    // declare fails (docs/fault-tolerance.md, "Known limits").
    if (rejoined_) return false;
    std::unique_lock<std::mutex> lock(failover_->mu);
    if (!failover_->replicated) return false;
    if (!MayBeLost(server, why) && !failover_->Dead(server)) return false;
    spdlog::warn(
        "worker {}: creating chunks on server {} failed ({}): waiting for it to be "
        "replaced",
        rank_, server, why.ToString());
    failover_->cv.wait_for(lock, std::chrono::milliseconds(FailoverWaitMs()), [&] {
      return failover_->stop || !failover_->failed.ok() || failover_->Dead(server);
    });
    return failover_->Dead(server) && !failover_->stop && failover_->failed.ok();
  }

  Result<Bytes> CallCreate(RpcChannel& rpc, const Bytes& body, Bytes init) {
    struct St {
      std::mutex mu;
      std::condition_variable cv;
      bool done = false;
      Status st;
      Bytes body;
    };
    auto st = std::make_shared<St>();
    rpc.Call(kCreateChunks, body, transport::Payload::Own(std::move(init)),
             [st](Status s, Reader& r, transport::Message&) {
               std::lock_guard<std::mutex> lock(st->mu);
               st->st = s;
               auto rest = r.rest();
               st->body.assign(rest.begin(), rest.end());
               st->done = true;
               st->cv.notify_all();
             });
    std::unique_lock<std::mutex> lock(st->mu);
    if (!st->cv.wait_for(lock, opt_.rpc_timeout, [&] { return st->done; }))
      return Status::Timeout("creating chunks: no reply");
    if (!st->st.ok()) return st->st;
    return st->body;
  }

  Handle Route(TensorId id, const float* grad, float* out) {
    const bool grad_on_device = OnDevice(grad), out_on_device = OnDevice(out);
    const bool device = grad_on_device || out_on_device;
    if (reducer_ && (!device || reducer_->TakesDevicePointers())) return StartNode(id, grad, out);
    if (device) return Staged(id, grad, out, grad_on_device, out_on_device, reducer_ != nullptr);
    return Start(id, grad, out);
  }

  bool OnDevice(const void* p) const { return p && cuda_ && cuda_->IsDevice(p); }

  // An operation on GPU memory through pinned host buffers of the tensor's (where the transport,
  // or the node reducer, takes host memory only): the gradient is copied to the host before the
  // operation starts, the parameters back to the GPU once it completed, then the caller's
  // handle completes. Host pointers among them are used as they are (the caller says which are
  // on the GPU).
  Handle Staged(TensorId id, const float* grad, float* out, bool grad_on_device, bool out_on_device,
                bool node) {
    auto user = std::make_shared<OpState>();
    user->poll = opt_.busy_poll;
    TensorInfo* t = Admit(*user, id);
    if (t == nullptr) return Handle(user);
    if (!t->pinned) t->pinned = std::make_shared<PinnedPool>(cuda_, t->numel * 4);
    auto pool = t->pinned;
    const size_t bytes = t->numel * 4;
    void* g = nullptr;
    void* o = nullptr;
    Status st;
    if (grad_on_device) {
      auto p = pool->Take();
      st = p.ok() ? cuda_->Copy(*p, grad, bytes) : p.status();
      g = p.ok() ? *p : nullptr;
    }
    if (st.ok() && out_on_device) {
      auto p = pool->Take();
      st = p.status();
      o = p.ok() ? *p : nullptr;
    }
    if (!st.ok()) {
      pool->Give(g);
      pool->Give(o);
      Failed(*user, st.WithContext("staging GPU memory through the host"));
      return Handle(user);
    }
    user->remaining = 1;
    const float* host_grad = grad_on_device ? static_cast<const float*>(g) : grad;
    float* host_out = out_on_device ? static_cast<float*>(o) : out;
    auto done = [cuda = cuda_, pool, g, o, out, out_on_device, bytes, user](OpState& in) {
      Status st;
      uint64_t v = UINT64_MAX;
      {
        std::lock_guard<std::mutex> lock(in.mu);
        st = in.error;
        v = in.version;
      }
      if (st.ok() && out_on_device) st = cuda->Copy(out, o, bytes);
      pool->Give(g);
      pool->Give(o);
      user->ChunkDone(st, v);
    };
    if (node)
      StartNode(id, host_grad, host_out, std::move(done));
    else
      StartOp(id, host_grad, host_out, false, std::move(done));
    return Handle(user);
  }

  // Completes `op` (one part) with `why`, calling its on_done: an operation that fails before it
  // starts.
  static void Failed(OpState& op, const Status& why) {
    op.remaining = 1;
    op.ChunkDone(why, 0);
  }

  // The tensor an operation is on, or null once `op` failed: an unknown tensor, a failed job.
  TensorInfo* Admit(OpState& op, TensorId id) {
    TensorInfo* t = Find(id);
    if (t == nullptr) {
      Failed(op, Status::NotFound(fmt::format("unknown tensor id {}", id)));
    } else if (Status f = node_->failure(); !f.ok()) {
      Failed(op, f);
      t = nullptr;
    }
    return t;
  }

  TensorInfo* Find(TensorId id) const {
    std::lock_guard<std::mutex> lock(tensors_mu_);
    return id < tensors_.size() ? tensors_[id].get() : nullptr;
  }

  // Counts an operation on `t` in the worker's metrics and timeline; completing `op` counts its
  // latency.
  void Meter(OpState& op, const TensorInfo& t, TensorId id, int kind) {
    op.meters = meters_;
    op.latency = kind == 0 ? &meters_->push : kind == 1 ? &meters_->pull : &meters_->push_pull;
    op.start = std::chrono::steady_clock::now();
    meters_->in_flight.fetch_add(1, std::memory_order_relaxed);
    if (meters_->timeline) {
      static constexpr const char* kNames[] = {"push", "pull", "push_pull"};
      op.op_name = kNames[kind];
      op.tensor = id;
      op.span_args.keys[0] = "numel";
      op.span_args.values[0] = static_cast<int64_t>(t.numel);
      op.span_args.text_key = "tensor";
      op.span_args.text = t.escaped_name;
    }
  }

  // Push (out null), pull (grad null) or push_pull of tensor `id`'s chunks: all of them, or with
  // `share` (node-level reduction) those this worker pushes for its node, unmetered (the node
  // operation is). `done`: called when it completed.
  Handle Start(TensorId id, const float* grad, float* out) {
    return Handle(StartOp(id, grad, out));
  }

  // `share_lr`: the rate a node operation captured when it was issued (share); otherwise the
  // tensor's.
  std::shared_ptr<OpState> StartOp(TensorId id, const float* grad, float* out, bool share = false,
                                   std::function<void(OpState&)> done = nullptr,
                                   std::optional<float> share_lr = std::nullopt) {
    auto op = std::make_shared<OpState>();
    op->poll = opt_.busy_poll;
    op->on_done = std::move(done);
    TensorInfo* t = Admit(*op, id);
    if (t == nullptr) return op;
    const uint32_t me = share ? reducer_->local_rank() : 0;
    auto skip = [&](const ChunkRef& c) { return share && c.owner != me; };
    const std::optional<float> lr = share ? share_lr : t->lr;
    size_t count = 0;
    for (const auto& c : t->chunks) count += skip(*c) ? 0 : 1;
    // A compressed push is encoded here, before the call returns, into a registered buffer
    // that the chunks are written from (the gradient may be reused once it is encoded).
    std::shared_ptr<transport::MemoryRegion> staged;
    std::vector<uint64_t> encoded;  // each chunk's encoded bytes
    if (grad && t->staging) {
      auto r = t->staging->Take();
      if (!r.ok()) {
        Failed(*op, r.status());
        return op;
      }
      staged = std::move(r).value();
      auto* base = static_cast<uint8_t*>(staged->data());
      // During a topk warm-up each push sends its own share (at most the first push's).
      const Compression now = t->compression.AtPush(t->numel, t->pushes++);
      const bool warming = !(now == t->compression);
      encoded.resize(t->chunks.size());
      for (size_t i = 0; i < t->chunks.size(); ++i) {
        const ChunkRef& c = *t->chunks[i];
        if (skip(c)) continue;
        const compress::ChunkCodec cc =
            warming ? compress::ForChunk(now, t->numel, c.offset, c.numel) : c.codec;
        encoded[i] = compress::EncodedBytes(cc, c.numel);
        compress::Encode(cc, grad + c.offset, c.numel, base + c.encoded_offset,
                         t->residual.empty() ? nullptr : t->residual.data() + c.offset);
      }
    }
    const int kind = grad ? (out ? 2 : 0) : 1;
    if (!share) t->ops[kind].fetch_add(1, std::memory_order_relaxed);
    if (!share && count > 0) Meter(*op, *t, id, kind);
    const uint64_t step = grad ? IssueStep(*t) : 0;
    if (count == 0) {
      // Nothing of it here (a node's worker that owns none of its chunks): done now.
      if (op->on_done) op->on_done(*op);
      return op;
    }
    op->remaining = count;
    if (grad) op->acks_left = count;
    for (size_t i = 0; i < t->chunks.size(); ++i) {
      ChunkRef* ref = t->chunks[i].get();
      if (skip(*ref)) continue;
      if (Batched(*ref)) {
        BatchEntry e;
        e.chunk_id = ref->chunk_id;
        e.push = grad != nullptr;
        e.pull = out != nullptr;
        const void* bytes = nullptr;
        if (grad) {
          e.seq = step;
          e.base_version = ref->pulled_version.load();
          e.lr = lr;
          if (staged) {
            bytes = static_cast<const uint8_t*>(staged->data()) + ref->encoded_offset;
            e.bytes = encoded[i];
          } else {
            bytes = grad + ref->offset;
            e.bytes = ref->numel * 4;
          }
        }
        AddToBatch(ref->server, {ref, op, grad != nullptr, out ? out + ref->offset : nullptr}, e,
                   bytes);
        continue;
      }
      auto rpc = servers_[ref->server.load()];
      if (grad) {
        const uint64_t seq = step;
        PushSource src;
        src.lr = lr;
        if (staged) {
          src.region = staged;
          src.offset = ref->encoded_offset;
          src.bytes = encoded[i];
        } else {
          src.ptr = grad + ref->offset;
          src.bytes = ref->numel * 4;
        }
        PushChunk(rpc, ref, std::move(src), seq, op, out ? out + ref->offset : nullptr);
      } else {
        PullChunk(rpc, ref, out + ref->offset, op);
      }
    }
    return op;
  }

  // Node-level reduction (worker/node_reducer.h): a push or push_pull that the node's workers
  // carry out together, one phase at a time on the node thread.
  struct NodeOp {
    enum Phase { kFree, kReduce, kShare, kShares, kFinish, kDone };
    TensorId id = 0;
    TensorInfo* t = nullptr;
    uint64_t seq = 0;
    NodeOpKind kind = NodeOpKind::kPush;
    const float* grad = nullptr;
    float* out = nullptr;
    std::shared_ptr<OpState> user;   // what the caller's handle completes with
    std::shared_ptr<OpState> inner;  // this worker's share, pushed (and pulled)
    std::optional<float> lr;         // the tensor's rate when it was issued (SetLearningRate)
    uint64_t version = UINT64_MAX;   // the lowest version over every share's chunks
    Phase phase = kFree;
    bool front = false;  // it became its tensor's oldest: its phases (and deadlines) began
    Status error;
    std::chrono::steady_clock::time_point since;  // when the phase began
  };

  Handle StartNode(TensorId id, const float* grad, float* out,
                   std::function<void(OpState&)> done = nullptr) {
    auto op = std::make_shared<OpState>();
    op->poll = opt_.busy_poll;
    op->on_done = std::move(done);
    TensorInfo* t = Admit(*op, id);
    if (t == nullptr) return Handle(op);
    const int kind = out ? 2 : 0;
    t->ops[kind].fetch_add(1, std::memory_order_relaxed);
    Meter(*op, *t, id, kind);
    op->remaining = 1;
    NodeOp n;
    n.id = id;
    n.t = t;
    n.seq = ++t->node_ops;
    n.kind = out ? NodeOpKind::kPushPull : NodeOpKind::kPush;
    n.grad = grad;
    n.out = out;
    n.lr = t->lr;
    n.user = op;
    {
      std::lock_guard<std::mutex> lock(node_mu_);
      if (node_stop_) {
        op->ChunkDone(Status::Aborted("the worker is closing"), 0);
        return Handle(op);
      }
      node_ops_[id].push_back(std::move(n));
    }
    reducer_->Ring();
    return Handle(op);
  }

  // The node thread: moves every tensor's oldest node operation on as far as it goes, then
  // sleeps until the node's bell rings (a phase changed here or in another worker of the node,
  // or a share completed), at most kNodePoll so that deadlines and a failed job are seen.
  void NodeLoop() {
    constexpr auto kNodePoll = std::chrono::milliseconds(5);
    reducer_->OnThread();
    for (;;) {
      const uint32_t seen = reducer_->Bell();
      reducer_->Progress();
      std::vector<NodeOp*> fronts;
      {
        std::lock_guard<std::mutex> lock(node_mu_);
        if (node_stop_) break;
        // References to a deque's elements survive push_back; only this thread pops.
        for (auto& [id, q] : node_ops_)
          if (!q.empty()) fronts.push_back(&q.front());
      }
      const auto now = std::chrono::steady_clock::now();
      for (NodeOp* n : fronts)
        if (!n->front) {
          n->front = true;
          n->since = now;
        }
      bool moved = false;
      for (NodeOp* n : fronts) {
        while (n->phase != NodeOp::kDone && Advance(*n)) moved = true;
        if (n->phase != NodeOp::kDone) continue;
        const TensorId id = n->id;
        std::shared_ptr<OpState> user = std::move(n->user);
        const Status st = n->error;
        const uint64_t v = n->version;
        {
          std::lock_guard<std::mutex> lock(node_mu_);
          node_ops_[id].pop_front();
        }
        user->ChunkDone(st, v);
      }
      if (!moved) reducer_->WaitBell(seen, kNodePoll);
    }
    // Closing: the node's other workers learn that this one's operations failed, so that none of
    // them waits for it.
    std::lock_guard<std::mutex> lock(node_mu_);
    for (auto& [id, q] : node_ops_)
      for (NodeOp& n : q) {
        if (n.front) reducer_->Abandon(n.id, n.seq);
        n.user->ChunkDone(Status::Aborted("the worker is closing"), 0);
      }
    node_ops_.clear();
  }

  // One phase of `n`; false when it must wait.
  bool Advance(NodeOp& n) {
    const auto now = std::chrono::steady_clock::now();
    const uint32_t node = view_.worker_nodes[rank_];
    auto next = [&](NodeOp::Phase p) {
      n.phase = p;
      n.since = now;
      return true;
    };
    // Waiting on the node's other workers: a failed job ends the wait; so does a worker that
    // did not get to the phase within the RPC timeout (not the shares, which wait on servers).
    auto waiting = [&](NodePhase phase, const char* what) {
      Status failed = node_->failure();
      if (failed.ok() && (phase == NodePhase::kShareDone || now - n.since < opt_.rpc_timeout))
        return false;
      if (!failed.ok()) {
        reducer_->Abort();
        n.error = failed;
      } else {
        const std::vector<uint32_t> missing = reducer_->Missing(n.id, n.seq, phase);
        n.error = Status::Timeout(
            missing.empty()
                ? fmt::format("node-level reduction of tensor '{}', operation {}: the node's {} "
                              "collective did not complete within {} ms",
                              n.t->name, n.seq, reducer_->name(), opt_.rpc_timeout.count())
                : fmt::format("node-level reduction of tensor '{}', operation {}: local rank(s) "
                              "{} of node {} did not {} within {} ms",
                              n.t->name, n.seq, fmt::join(missing, ", "), node, what,
                              opt_.rpc_timeout.count()));
      }
      // Given up: marked failed and finished in this worker's lane, so that the others' waits
      // for it end (with an error) and the tensor's next operation starts from a clean state.
      reducer_->Abandon(n.id, n.seq);
      n.phase = NodeOp::kDone;
      return true;
    };
    switch (n.phase) {
      case NodeOp::kFree:
        if (!reducer_->Free(n.id, n.seq))
          return waiting(NodePhase::kFree, "finish the previous operation");
        if (Status st = reducer_->Contribute(n.id, n.seq, n.kind, n.grad); !st.ok()) {
          n.error = st.WithContext(fmt::format("node-level reduction of tensor '{}'", n.t->name));
          reducer_->Abandon(n.id, n.seq);
          n.phase = NodeOp::kDone;
          return true;
        }
        return next(NodeOp::kReduce);
      case NodeOp::kReduce: {
        auto sum = reducer_->Reduce(n.id, n.seq, n.t->mine);
        if (!sum.ok()) {
          n.error = sum.status();
          reducer_->ShareDone(n.id, n.seq, false, UINT64_MAX);
          return next(NodeOp::kShares);
        }
        if (*sum == nullptr) return waiting(NodePhase::kContributed, "hand in their gradient");
        next(NodeOp::kShare);
        NodeReducer* r = reducer_.get();
        n.inner = StartOp(
            n.id, *sum, n.kind == NodeOpKind::kPushPull ? reducer_->Gather(n.id) : nullptr, true,
            [r](OpState&) { r->Ring(); }, n.lr);
        return true;
      }
      case NodeOp::kShare: {
        if (n.inner->remaining.load() != 0) return false;  // its own calls have deadlines
        uint64_t v = UINT64_MAX;
        {
          std::lock_guard<std::mutex> lock(n.inner->mu);
          n.error = n.inner->error;
          v = n.inner->version;
        }
        reducer_->ShareDone(n.id, n.seq, n.error.ok(), v);
        return next(NodeOp::kShares);
      }
      case NodeOp::kShares: {
        auto shares = reducer_->Shares(n.id, n.seq);
        if (!shares) return waiting(NodePhase::kShareDone, "finish their share");
        if (n.error.ok() && !shares->failed.empty())
          n.error = Status::Aborted(fmt::format(
              "node-level reduction of tensor '{}', operation {}: the share of local rank(s) {} "
              "of node {} failed (see its log)",
              n.t->name, n.seq, fmt::join(shares->failed, ", "), node));
        n.version = shares->version;
        return next(NodeOp::kFinish);
      }
      case NodeOp::kFinish: {
        // The gathered parameters out (a GPU reducer's broadcast may still be under way).
        auto fin = reducer_->Finish(
            n.id, n.seq, n.error.ok() && n.kind == NodeOpKind::kPushPull ? n.out : nullptr);
        if (!fin.ok()) {
          if (n.error.ok()) n.error = fin.status();
        } else if (!*fin) {
          return waiting(NodePhase::kFinished, "gather the parameters");
        }
        n.phase = NodeOp::kDone;
        return true;
      }
      case NodeOp::kDone:
        return false;
    }
    return false;
  }

  void PullChunk(const std::shared_ptr<RpcChannel>& rpc, ChunkRef* ref, float* dst,
                 const std::shared_ptr<OpState>& op) {
    auto job = std::make_shared<PullJob>();
    job->rpc = rpc;
    job->chunk = ref;
    job->slots = &ref->SlotsOn(IndexOf(rpc));
    job->dst = dst;
    if (view_.replicas > 0) {
      const uint32_t server = IndexOf(rpc);
      job->failed = [this, server, ref, dst, op](Status st) {
        AfterFailover(server, st, op, ref, [this, ref, dst, op] {
          PullChunk(servers_[ref->server.load()], ref, dst, op);
        });
      };
    }
    job->op = op;
    job->bytes_pulled = &bytes_pulled_;
    job->in_order = kLoadsStayInOrder && data_ctx_->OneSidedInOrder();
    job->Start();
  }

  using Grant = LandingGrant;
  // Landing buffers a server granted ahead, with an acknowledgement, for the next pushes.
  struct Credits {
    std::mutex mu;
    std::vector<Grant> grants;  // guarded by mu
  };

  // The rank of the server `rpc` talks to (an operation keeps the server it started on, whatever
  // a failover does to its chunk meanwhile).
  uint32_t IndexOf(const std::shared_ptr<RpcChannel>& rpc) const {
    for (uint32_t s = 0; s < NumServers(); ++s)
      if (servers_[s] == rpc) return s;
    return 0;
  }

  std::optional<Grant> TakeCredit(uint32_t server) {
    Credits& c = *credits_[server];
    std::lock_guard<std::mutex> lock(c.mu);
    if (c.grants.empty()) return std::nullopt;
    Grant g = std::move(c.grants.back());
    c.grants.pop_back();
    return g;
  }

  // What a chunk's push writes: the caller's fp32 gradient, or its encoding in a staging
  // buffer (kept alive until the write completed).
  struct PushSource {
    const void* ptr = nullptr;
    std::shared_ptr<transport::MemoryRegion> region;
    uint64_t offset = 0;
    uint64_t bytes = 0;
    std::optional<float> lr;  // the tensor's learning rate when the push was issued
  };

  // (grant ->) one-sided write into the landing buffer -> notification -> ack (-> pull). A
  // buffer granted ahead spares the grant round trip.
  void PushChunk(const std::shared_ptr<RpcChannel>& rpc, ChunkRef* ref, PushSource src,
                 uint64_t seq, const std::shared_ptr<OpState>& op, float* then_pull) {
    const uint32_t server = IndexOf(rpc);
    if (std::optional<Grant> g = TakeCredit(server))
      return WriteAndNotify(rpc, ref, std::move(src), seq, op, then_pull, *g);
    Bytes body;
    Writer w(&body);
    GrantRequest{.chunk_id = ref->chunk_id, .bytes = src.bytes, .worker = rank_, .seq = seq}.Encode(
        &w);
    rpc->Call(kGrant, body, {},
              [this, rpc, ref, src = std::move(src), seq, op, then_pull, server](
                  Status st, Reader& r, transport::Message&) mutable {
                Grant g;
                if (st.ok() && !g.Decode(&r)) st = Status::ProtocolError("malformed grant");
                if (!st.ok()) return PushAgain(server, st, ref, std::move(src), seq, op, then_pull);
                WriteAndNotify(rpc, ref, std::move(src), seq, op, then_pull, g);
              });
  }

  // The gradient written into the landing buffer and the notification that follows it, in one
  // go (Connection::WriteThenSend: one frame over tcp).
  void WriteAndNotify(const std::shared_ptr<RpcChannel>& rpc, ChunkRef* ref, PushSource src,
                      uint64_t seq, const std::shared_ptr<OpState>& op, float* then_pull,
                      const Grant& g) {
    bytes_pushed_ += src.bytes;
    Bytes note;
    Writer w(&note);
    PushDone{.chunk_id = ref->chunk_id,
             .buffer = g.buffer,
             .worker = rank_,
             .seq = seq,
             .bytes = src.bytes,
             .base_version = ref->pulled_version.load(),
             .lr = src.lr}
        .Encode(&w);
    // The push completes once it was acknowledged and its bytes left (a call failed while its
    // frame waits to go is answered first): the caller's gradient, or the staging buffer held
    // here, is in use until then.
    struct Flight {
      std::mutex mu;
      bool sent = false;
      bool answered = false;
      Status status;
      PushAck ack;
    };
    auto f = std::make_shared<Flight>();
    const uint32_t server = IndexOf(rpc);
    auto finish = [this, rpc, ref, op, then_pull, f, server, src, seq] {
      if (!f->status.ok()) return PushAgain(server, f->status, ref, src, seq, op, then_pull);
      OnPushAck(rpc, ref, op, then_pull, f->status, f->ack);
    };
    auto acked = [f, finish](Status st, Reader& r, transport::Message&) {
      PushAck ack;
      if (st.ok() && (!ack.Decode(&r) || !r.done()))
        st = Status::ProtocolError("malformed push ack");
      {
        std::lock_guard<std::mutex> lock(f->mu);
        f->answered = true;
        f->status = st;
        f->ack = std::move(ack);
        if (!f->sent) return;
      }
      finish();
    };
    auto sent = [f, finish, hold = src.region](Status) {
      {
        std::lock_guard<std::mutex> lock(f->mu);
        f->sent = true;
        if (!f->answered) return;
      }
      finish();
    };
    if (src.region) {
      rpc->CallAfterWrite(transport::LocalSpan{src.region.get(), src.offset, src.bytes}, g.key,
                          g.offset, kPushDone, note, std::move(acked), std::move(sent));
    } else {
      rpc->CallAfterWrite(src.ptr, src.bytes, g.key, g.offset, kPushDone, note, std::move(acked),
                          std::move(sent));
    }
  }

  // A push that failed on `server`: sent again (same sequence number) to the chunk's backup
  // once the server was replaced, when the job keeps backups (AfterFailover).
  void PushAgain(uint32_t server, const Status& st, ChunkRef* ref, PushSource src, uint64_t seq,
                 const std::shared_ptr<OpState>& op, float* then_pull) {
    AfterFailover(server, st, op, ref, [this, ref, src = std::move(src), seq, op, then_pull] {
      PushChunk(servers_[ref->server.load()], ref, src, seq, op, then_pull);
    });
  }

  void OnPushAck(const std::shared_ptr<RpcChannel>& rpc, ChunkRef* ref,
                 const std::shared_ptr<OpState>& op, float* then_pull, const Status& st,
                 PushAck ack) {
    if (!st.ok()) return op->ChunkDone(st, 0);
    if (ack.has_ahead) {
      Credits& c = *credits_[IndexOf(rpc)];
      std::lock_guard<std::mutex> lock(c.mu);
      c.grants.push_back(std::move(ack.ahead));
    }
    const uint64_t v = ack.version;
    Acked(ref, *op, v, ack.late);
    if (then_pull) return PullChunk(rpc, ref, then_pull, op);
    op->ChunkDone(Status::OK(), v);
  }

  // A chunk's push was acknowledged with version v.
  void Acked(ChunkRef* ref, OpState& op, uint64_t v, bool late) {
    RaiseTo(ref->known_version, v);
    if (late) late_pushes_++;
    // Dropped (late: its step was published without it, backup workers): once every chunk
    // answered, the tensor's next push is for the step after the version published on all of
    // them, so no chunk is ever pushed a step that the others will not push too.
    std::lock_guard<std::mutex> lock(op.mu);
    op.late = op.late || late;
    op.ack_min = std::min(op.ack_min, v);
    if (--op.acks_left == 0 && op.late) RaiseTo(*ref->tensor_step, op.ack_min + 1);
  }

  // Small chunks travel in batches unless batching is off (fuse_bytes 0).
  bool Batched(const ChunkRef& ref) const {
    return opt_.fuse_bytes > 0 && ref.numel * 4 <= kMaxBatchedChunkBytes;
  }

  // Queues an operation on a small chunk for its server's next batch: sent at once when the
  // batch reached its size bound; else, without a fuse delay, by a flush on the data loop, which
  // runs once the loop is free (operations issued meanwhile join the batch); with one, by the
  // fuse thread once the oldest operation in it waited that long.
  void AddToBatch(uint32_t server, Batcher::Item item, const BatchEntry& e, const void* grad) {
    Batcher& b = *batchers_[server];
    if (b.Add(std::move(item), e, grad, opt_.fuse_bytes, SyncWindow()))
      return b.Send(servers_[server]->connection(), rank_, &bytes_pushed_);
    WantFlush(server);
  }

  // sync: how many steps a batched push may be ahead of the version its worker knows (what the
  // server sums ahead of its version); 0 elsewhere (async applies on arrival; ssp parks by
  // the slowest worker's clock, which the worker does not know).
  uint64_t SyncWindow() const { return view_.mode == Mode::kSync ? kSyncStepsAhead : 0; }

  // A batch has operations waiting: its flush is scheduled (data loop), or the fuse thread told.
  void WantFlush(uint32_t server) {
    Batcher& b = *batchers_[server];
    if (opt_.fuse_delay.count() > 0) {
      std::lock_guard<std::mutex> lock(fuse_mu_);
      if (!fuse_kick_) {
        fuse_kick_ = true;
        fuse_cv_.notify_one();
      }
      return;
    }
    if (b.Schedule()) ScheduleFlush(server);
  }

  void ScheduleFlush(uint32_t server) {
    auto send = [this, server] {
      batchers_[server]->Flush(servers_[server]->connection(), rank_, {}, &bytes_pushed_);
    };
    // The worker is going away when the loop refuses: send now (its operations fail when the
    // connection closes).
    if (!data_ctx_->RunInLoop(send)) send();
  }

  // --fuse-us: sends each batch once its oldest operation waited `fuse_delay`. A thread of its
  // own: the transport's loop has no timers, and a loop task that re-posted itself until then
  // would keep the loop from serving the network meanwhile.
  void FuseLoop() {
    const auto delay = opt_.fuse_delay;
    std::unique_lock<std::mutex> lock(fuse_mu_);
    while (!fuse_stop_) {
      fuse_kick_ = false;
      lock.unlock();
      auto next = std::chrono::steady_clock::now() + std::chrono::seconds(1);
      for (uint32_t s = 0; s < NumServers(); ++s) {
        if (!batchers_[s]) continue;
        Batcher& b = *batchers_[s];
        if (!b.Flush(servers_[s]->connection(), rank_, delay, &bytes_pushed_))
          next = std::min(next, b.Oldest() + delay);  // not old enough yet
      }
      lock.lock();
      fuse_cv_.wait_until(lock, next, [&] { return fuse_stop_ || fuse_kick_; });
    }
  }

  // Data loop thread: what a server answered for a batch. False (the connection is closed) when
  // it is malformed.
  bool OnBatchAnswer(Batcher& b, uint32_t server, transport::Message& m) {
    BatchAnswer a;
    Reader r(m.meta.data(), m.meta.size());
    if (!a.Decode(&r) || !r.done()) return false;
    std::vector<Batcher::Completed> done;
    if (!b.OnAnswer(a, m.payload, &done)) return false;
    for (auto& c : done) {
      const BatchResult& x = c.result;
      OpState& op = *c.item.op;
      ChunkRef* ref = c.item.ref;
      if (!x.status.ok()) {
        if (c.item.grad || !c.item.push) {
          // Replication: a replaced primary that still runs refuses what its chunks' backups
          // refused it (Aborted); sent again once it is declared dead (AfterFailover).
          auto item = c.item;
          AfterFailover(server, x.status, c.item.op, ref, [this, item] {
            AddToBatch(item.ref->server.load(), item, item.entry,
                       item.grad ? item.grad->data() : nullptr);
          });
          continue;
        }
        op.ChunkDone(x.status, 0);
        continue;
      }
      uint64_t v = x.version;
      if (c.item.push) Acked(ref, op, v, x.late);
      if (c.item.pull_into) {
        if (ref->pull_codec != Codec::kNone) {
          compress::DecodeParams(ref->pull_codec, c.params, ref->numel, c.item.pull_into);
        } else {
          std::memcpy(c.item.pull_into, c.params, x.pulled_bytes);
        }
        bytes_pulled_ += x.pulled_bytes;
        v = x.pulled_version;
        RaiseTo(ref->known_version, v);
        RaiseTo(ref->pulled_version, v);
      }
      op.ChunkDone(Status::OK(), v);
    }
    // Pushes that waited for these chunks' versions to rise.
    if (SyncWindow() > 0) {
      std::vector<std::pair<ChunkRef*, bool>> refs;  // with whether it answered an error
      for (auto& c : done) refs.emplace_back(c.item.ref, !c.result.status.ok());
      std::sort(refs.begin(), refs.end());
      bool joined = false;
      for (size_t i = 0; i < refs.size(); ++i) {
        if (i + 1 < refs.size() && refs[i + 1].first == refs[i].first) continue;  // last: any error
        joined |= b.Release(refs[i].first, SyncWindow(), refs[i].second, opt_.fuse_bytes,
                            servers_[server]->connection(), rank_, &bytes_pushed_);
      }
      if (joined) WantFlush(server);
    }
    return true;
  }

  WorkerOptions opt_;
  std::unique_ptr<transport::Context> control_ctx_;
  std::unique_ptr<transport::Context> data_ctx_;
  std::unique_ptr<NodeClient> node_;
  ClusterView view_;
  uint32_t rank_ = 0;
  bool rejoined_ = false;  // took the place of a removed worker (RegisterReply::rejoined)
  std::atomic<uint64_t> checkpoints_{0};  // Checkpoint calls, naming their barriers
  // Checkpoints of the running job (CloseGate, IssueStep): new pushes wait while one is taken.
  struct PushGate {
    std::mutex mu;
    std::condition_variable cv;
    bool ready = false;  // Init is done: `rank` is known, pushes may start
    uint32_t rank = 0;
    uint64_t id = 0;                                  // the checkpoint holding pushes; 0: none
    bool cut = false;                                 // its cuts are known: pushes up to `bound` go
    std::unordered_map<std::string, uint64_t> bound;  // tensor -> last sequence number to push
    std::chrono::steady_clock::time_point until;      // held no longer than this
    std::atomic<bool> gated{false};                   // id != 0, read without the lock
    // Lets every held push go (under mu): the checkpoint is over, given up, or the job failed.
    void OpenLocked() {
      id = 0;
      cut = false;
      bound.clear();
      gated.store(false);
    }
  };
  // Shared with the job-failure handler, which opens it (a push held by a checkpoint of a job
  // that failed goes on, to fail with it).
  std::shared_ptr<PushGate> gate_ = std::make_shared<PushGate>();
  std::atomic<uint32_t> issuing_{0};  // pushes taking a number past an open gate
  std::atomic<bool> leading_{false};  // worker 0: lead_thread_ writes a checkpoint
  std::mutex lead_mu_;                // guards lead_thread_ and lead_closing_
  std::thread lead_thread_;
  bool lead_closing_ = false;  // the destructor took lead_thread_: no new one
  // LeadCheckpoint: one checkpoint written at a time.
  std::mutex write_mu_;
  std::condition_variable write_cv_;
  bool writing_ = false;  // guarded by write_mu_
  // By server rank, as many as a job can have: set once each (ConnectServer), at Init and as
  // servers join the running job, so that readers take them without a lock. Those below
  // NumServers() are set, but for a server that joined and could not be reached (null).
  std::vector<std::shared_ptr<RpcChannel>> servers_{kMaxServers};
  std::vector<std::unique_ptr<Credits>> credits_ =
      std::vector<std::unique_ptr<Credits>>(kMaxServers);
  std::vector<std::shared_ptr<Batcher>> batchers_{kMaxServers};
  std::atomic<uint32_t> num_servers_{0};
  // --fuse-us: the thread that sends batches when they are old enough (FuseLoop).
  std::thread fuse_thread_;
  std::mutex fuse_mu_;
  std::condition_variable fuse_cv_;
  bool fuse_stop_ = false;  // guarded by fuse_mu_
  bool fuse_kick_ = false;  // guarded by fuse_mu_: a batch got its first operation
  std::shared_ptr<FailedServers> failed_servers_ = std::make_shared<FailedServers>();
  std::shared_ptr<Failover> failover_ = std::make_shared<Failover>();
  std::thread failover_thread_;  // replication: FailoverWatch
  // Node-level reduction (local_size above 1): the reducer, the thread that drives node
  // operations, their queues (per tensor, oldest first), and the bytes of chunks each local rank
  // pushes so far (Declare's split).
  std::unique_ptr<NodeReducer> reducer_;
  // The CUDA runtime, where it loads and a GPU is visible: operations on GPU memory.
  std::shared_ptr<gpu::Cuda> cuda_;
  std::thread node_thread_;
  std::mutex node_mu_;
  bool node_stop_ = false;                           // guarded by node_mu_
  std::map<TensorId, std::deque<NodeOp>> node_ops_;  // guarded by node_mu_
  std::vector<uint64_t> node_load_;                  // guarded by declare_mu_
  std::mutex declare_mu_;

  std::atomic<bool> finished_{false};
  std::function<void(uint32_t)> create_hook_;  // BeforeCreateForTest
  std::atomic<uint64_t> bytes_pushed_{0};      // written into landing buffers (encoded)
  std::atomic<uint64_t> bytes_pulled_{0};      // read from published slots (encoded)
  std::atomic<uint64_t> late_pushes_{0};       // acknowledged late, dropped by the server
  std::shared_ptr<worker::Meters> meters_ = std::make_shared<worker::Meters>();
  metrics::RoleMetrics metrics_;
  mutable std::mutex tensors_mu_;
  std::vector<std::unique_ptr<TensorInfo>> tensors_;
  // tensors_mu_: new backups of chunks this worker has not declared (kBackupsAdded), by chunk.
  std::map<uint64_t, uint32_t> unattached_backups_;
  std::map<std::string, TensorId> by_name_;
};

}  // namespace
}  // namespace worker

namespace worker {
void DieWithoutGoodbyeForTest(std::unique_ptr<Worker>& w) {
  dynamic_cast<WorkerImpl&>(*w).SkipGoodbye();
  w.reset();
}
void BeforeCreateForTest(Worker& w, std::function<void(uint32_t server)> hook) {
  dynamic_cast<WorkerImpl&>(w).BeforeCreate(std::move(hook));
}
}  // namespace worker

Result<std::unique_ptr<Worker>> Worker::Connect(const WorkerOptions& options) {
  SHARDPS_RETURN_IF_ERROR(options.Validate());
  auto w = std::make_unique<worker::WorkerImpl>(options);
  SHARDPS_RETURN_IF_ERROR(w->Init());
  return std::unique_ptr<Worker>(std::move(w));
}

}  // namespace shardps
