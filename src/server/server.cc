#include "shardps/server.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <fstream>
#include <map>
#include <shared_mutex>
#include <thread>

#include <sched.h>
#include <unistd.h>
#include <unordered_map>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

#include "cluster/messages.h"
#include "cluster/node_client.h"
#include "cluster/rpc.h"
#include "server/applier.h"
#include "server/landing_pool.h"
#include "server/optimizer.h"
#include "transport/context.h"

namespace shardps {

Status ServerOptions::Validate() const {
  if (coordinator.empty()) return Status::InvalidArgument("the server needs a coordinator address");
  if (landing_buffers < 1 || landing_buffers > 4096)
    return Status::InvalidArgument(
        fmt::format("landing buffers {} outside [1, 4096]", landing_buffers));
  if (apply_threads < 1 || apply_threads > 64)
    return Status::InvalidArgument(fmt::format("apply threads {} outside [1, 64]", apply_threads));
  if (busy_poll.count() < 0 || busy_poll.count() > 1000000)
    return Status::InvalidArgument(
        fmt::format("busy poll of {} us outside [0, 1000000]", busy_poll.count()));
  auto v = transport::CheckViability(transport);
  if (!v.viable) return Status::InvalidArgument("transport " + transport + ": " + v.reason);
  return Status::OK();
}

std::string ServerStats::ToJson() const {
  nlohmann::json j = {{"chunks", chunks},
                      {"parameter_bytes", parameter_bytes},
                      {"pushes_applied", pushes_applied},
                      {"duplicate_pushes", duplicate_pushes},
                      {"versions_published", versions_published},
                      {"grant_requests", grant_requests},
                      {"grants_waited", grants_waited},
                      {"grants_ahead", grants_ahead},
                      {"landing_buffers", landing_buffers},
                      {"apply_threads", apply_threads},
                      {"ranges_helped", ranges_helped},
                      {"rss_bytes", rss_bytes},
                      {"peak_rss_bytes", peak_rss_bytes}};
  return j.dump();
}

namespace server {
namespace {

using namespace cluster;
using transport::Connection;

constexpr size_t kMaxEarlyMessages = 4096;  // held before the server is ready
constexpr uint64_t kMaxStepsAhead = 2;      // sync: pushes further ahead wait, holding their buffer
// Chunks this small are applied on the transport thread that receives their pushes: such an
// apply takes about a microsecond, less than handing it to an apply thread and back. A chunk's
// size never changes, so each chunk still has exactly one owning thread.
constexpr uint64_t kInlineApplyBytes = 64 << 10;
// An update of a chunk is split into ranges of this many elements (256 KiB) that idle apply
// threads run alongside the chunk's own (Applier::ParallelFor).
constexpr size_t kRangeElements = 64 << 10;

void ReadRss(uint64_t* rss, uint64_t* peak) {
  std::ifstream f("/proc/self/status");
  std::string line;
  while (std::getline(f, line)) {
    unsigned long long kb = 0;
    if (std::sscanf(line.c_str(), "VmRSS: %llu kB", &kb) == 1) *rss = kb * 1024;
    if (std::sscanf(line.c_str(), "VmHWM: %llu kB", &kb) == 1) *peak = kb * 1024;
  }
}

struct Ack {
  std::shared_ptr<Connection> conn;
  uint64_t request = 0;
};

struct PushTask {
  std::shared_ptr<Connection> conn;
  uint64_t request = 0;
  uint64_t chunk_id = 0;
  uint32_t buffer = 0;
  uint32_t worker = 0;
  uint64_t seq = 0;
};

struct Chunk {
  uint64_t id = 0;
  std::string tensor;
  uint64_t offset = 0;
  uint64_t numel = 0;
  OptimizerConfig opt;
  SlotLayout layout;
  std::unique_ptr<transport::MemoryRegion> slots;
  std::atomic<uint64_t> version{0};

  // Owned by the chunk's apply thread. The current parameters are those in slot version % 2;
  // an update writes the next version straight into the other slot.
  OptimizerState state;
  std::vector<std::vector<float>> spare;  // recycled accumulators (no page faults per step)
  std::vector<uint64_t> last_seq;         // per worker rank
  struct Step {
    // The running sum: in the next slot (free while this step is next in line, so sync mode
    // needs no model-sized accumulator), or in `own` for a step pushed ahead of that.
    float* sum = nullptr;
    std::vector<float> own;
    uint32_t count = 0;
    std::vector<Ack> acks;
  };
  std::map<uint64_t, Step> steps;
  std::deque<PushTask> deferred;
};

class ServerImpl final : public Server {
 public:
  explicit ServerImpl(ServerOptions o) : opt_(std::move(o)) {}

  ~ServerImpl() override {
    applier_.Stop();
    listener_.reset();
    node_.reset();
    data_ctx_.reset();
    control_ctx_.reset();
  }

  Status Init() {
    transport::ContextOptions co;
    co.name = "server-data";
    co.busy_poll = opt_.busy_poll;
    auto dctx = transport::CreateContext(opt_.transport, co);
    if (!dctx.ok()) return dctx.status();
    data_ctx_ = std::move(dctx).value();
    auto l = data_ctx_->Listen(opt_.listen, [this](const std::shared_ptr<Connection>&) {
      transport::ConnectionHandlers h;
      h.on_message = [this](const std::shared_ptr<Connection>& c, transport::Message m) {
        OnMessage(c, m);
      };
      h.on_close = [this](const std::shared_ptr<Connection>& c, Status) {
        if (ready_.load()) pool_.DropOwner(c.get());
      };
      return h;
    });
    if (!l.ok()) return l.status().WithContext("server listen");
    listener_ = std::move(l).value();

    co.name = "server-ctl";
    auto cctx = transport::CreateContext("tcp", co);
    if (!cctx.ok()) return cctx.status();
    control_ctx_ = std::move(cctx).value();
    NodeClientOptions no;
    no.coordinator = opt_.coordinator;
    no.role = Role::kServer;
    no.rank = opt_.rank;
    no.data_address = AdvertisedAddress();
    no.transport = opt_.transport;
    no.connect_timeout = opt_.connect_timeout;
    no.register_timeout = opt_.register_timeout;
    auto done = done_;
    auto node = NodeClient::Connect(control_ctx_.get(), no, [done](Status why, bool shutdown) {
      std::lock_guard<std::mutex> lock(done->mu);
      if (done->finished) return;
      done->finished = true;
      done->result = shutdown ? Status::OK() : why;
      done->cv.notify_all();
    });
    if (!node.ok()) {
      Finish(node.status());
      return node.status();
    }
    node_ = std::move(node).value();
    view_ = node_->info().view;
    rank_ = node_->info().rank;
    SHARDPS_RETURN_IF_ERROR(pool_.Init(data_ctx_.get(), opt_.landing_buffers, view_.chunk_bytes));
    // Apply threads poll for work as long as the transport polls for messages: where it
    // does not (tcp), a sleeping apply thread costs no more than the wake-up of the loop.
    applier_.Start(opt_.apply_threads, data_ctx_->busy_poll());
    // Ready, on the loop thread: the messages held until now are handled there, before any
    // that arrives later, in the order they came.
    if (!data_ctx_->RunInLoop([this] { BecomeReady(); }))
      return Status::Aborted("server stopping before it was ready");
    spdlog::info("server {}: data transport {}; {}", rank_, data_ctx_->backend(),
                 data_ctx_->CanRegisterGpuMemory()
                     ? "GPU memory is registered directly (GPUDirect RDMA)"
                     : "GPU memory cannot be registered: GPU shards are staged through "
                       "registered host memory");
    spdlog::info("server {} serving on {} ({} mode, {} workers, {} landing buffers of {} bytes)",
                 rank_, listener_->address(), ModeName(view_.mode), view_.num_workers,
                 opt_.landing_buffers, view_.chunk_bytes);
    return Status::OK();
  }

  std::string AdvertisedAddress() const {
    std::string host;
    uint16_t port = 0;
    if (!transport::ParseHostPort(listener_->address(), &host, &port).ok())
      return listener_->address();
    if (!opt_.advertise.empty()) {
      host = opt_.advertise;
    } else if (host == "0.0.0.0" || host.empty()) {
      char name[256] = {0};
      gethostname(name, sizeof(name) - 1);
      host = name;
    }
    return host + ":" + std::to_string(port);
  }

  uint32_t rank() const override { return rank_; }
  std::string address() const override { return listener_->address(); }

  Status Wait(std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(done_->mu);
    if (!done_->cv.wait_for(lock, timeout, [&] { return done_->finished; }))
      return Status::Timeout("the server is still serving");
    return done_->result;
  }

  ServerStats stats() const override {
    ServerStats s;
    {
      std::shared_lock<std::shared_mutex> lock(chunks_mu_);
      s.chunks = chunks_.size();
      for (auto& [id, c] : chunks_) s.parameter_bytes += c->numel * 4;
    }
    s.pushes_applied = pushes_applied_.load();
    s.duplicate_pushes = duplicates_.load();
    s.versions_published = versions_.load();
    s.grant_requests = grant_requests_.load();
    s.grants_waited = grants_waited_.load();
    s.grants_ahead = grants_ahead_.load();
    s.landing_buffers = pool_.size();
    s.apply_threads = opt_.apply_threads;
    s.ranges_helped = applier_.ranges_helped();
    ReadRss(&s.rss_bytes, &s.peak_rss_bytes);
    return s;
  }

 private:
  struct Done {
    std::mutex mu;
    std::condition_variable cv;
    bool finished = false;
    Status result;
  };

  void Finish(Status st) {
    std::lock_guard<std::mutex> lock(done_->mu);
    if (done_->finished) return;
    done_->finished = true;
    done_->result = std::move(st);
    done_->cv.notify_all();
  }

  // Workers may reach the data port a moment before this server processed its own
  // registration reply. Their messages wait in `early_` until it has (the loop thread must not
  // block on it: allocating the landing pool needs that thread, over ucx); false when m was
  // held. At most kMaxEarlyMessages wait; beyond that the connection is closed.
  bool ReadyFor(const std::shared_ptr<Connection>& c, transport::Message& m) {
    if (ready_.load()) return true;
    std::lock_guard<std::mutex> lock(ready_mu_);
    if (ready_.load()) return true;
    if (early_.size() >= kMaxEarlyMessages) {
      // Messages of connections that closed meanwhile are skipped anyway: make room first.
      std::erase_if(early_, [](const auto& e) { return e.first->closed(); });
    }
    if (early_.size() >= kMaxEarlyMessages) {
      // Not Drop(): rank_ is not known yet on this thread.
      spdlog::error("server: closing connection from {}: too many messages before it was ready",
                    c->peer());
      c->Close();
      return false;
    }
    early_.emplace_back(c, std::move(m));
    return false;
  }

  // Loop thread, once.
  void BecomeReady() {
    std::vector<std::pair<std::shared_ptr<Connection>, transport::Message>> held;
    {
      std::lock_guard<std::mutex> lock(ready_mu_);
      ready_ = true;
      held.swap(early_);
    }
    // A connection that closed meanwhile was not dropped from the pool (it was not ready):
    // its messages are skipped, so nothing is granted to it.
    for (auto& [c, m] : held)
      if (!c->closed()) OnMessage(c, m);
  }

  void Drop(const std::shared_ptr<Connection>& c, const std::string& why) {
    spdlog::error("server {}: closing connection from {}: {}", rank_, c->peer(), why);
    c->Close();
  }

  Chunk* FindChunk(uint64_t id) const {
    std::shared_lock<std::shared_mutex> lock(chunks_mu_);
    auto it = chunks_.find(id);
    return it == chunks_.end() ? nullptr : it->second.get();
  }

  void OnMessage(const std::shared_ptr<Connection>& c, transport::Message& m) {
    if (!ReadyFor(c, m)) return;
    Reader r(m.meta.data(), m.meta.size());
    uint64_t req = 0;
    if (!r.Get(&req)) return Drop(c, "message without a request id");
    switch (m.tag) {
      case kCreateChunks:
        return OnCreate(c, req, r, m);
      case kGrant:
        return OnGrant(c, req, r);
      case kPushDone:
        return OnPushDone(c, req, r);
      case kStats: {
        if (!r.done()) return Drop(c, "malformed stats request");
        std::string json = stats().ToJson();
        Bytes body;
        Writer w(&body);
        w.PutString(json);
        return Reply(*c, req, Status::OK(), body);
      }
      default:
        return Drop(c, fmt::format("unexpected message tag {}", m.tag));
    }
  }

  // Creates chunks from the initial values in the payload (worker 0), or, with an empty
  // payload, attaches to them (other workers): an attach for chunks that do not exist yet is
  // answered once they do. Only one copy of the initial values ever reaches the server.
  void OnCreate(const std::shared_ptr<Connection>& c, uint64_t req, Reader& r,
                transport::Message& m) {
    uint32_t n = 0;
    if (!r.Get(&n) || n > (1u << 20)) return Drop(c, "malformed create request");
    std::vector<CreateChunkItem> items(n);
    uint64_t total = 0;
    for (auto& it : items) {
      if (!it.Decode(&r)) return Drop(c, "malformed create request");
      if (it.numel == 0 || it.numel > view_.chunk_bytes / 4)
        return Reply(*c, req,
                     Status::InvalidArgument(
                         fmt::format("chunk {} of '{}' has {} elements; the bound is {}",
                                     it.chunk_id, it.tensor, it.numel, view_.chunk_bytes / 4)));
      Status v = it.optimizer.Validate();
      if (!v.ok()) return Reply(*c, req, v.WithContext("tensor '" + it.tensor + "'"));
      total += it.numel * 4;
    }
    bool attach = m.payload.size() == 0;
    if (!r.done() || (!attach && total != m.payload.size()))
      return Drop(c, "create request whose payload does not match its chunks");
    if (!attach) {
      const uint8_t* init = m.payload.data();
      for (auto& it : items) {
        if (!FindChunk(it.chunk_id)) {
          auto made = MakeChunk(it, reinterpret_cast<const float*>(init));
          if (!made.ok()) return Reply(*c, req, made.status());
        }
        init += it.numel * 4;
      }
    }
    attaches_.push_back(Attach{c, req, std::move(items)});
    AnswerAttaches();
  }

  // Loop thread: answers every create/attach whose chunks all exist.
  void AnswerAttaches() {
    for (auto it = attaches_.begin(); it != attaches_.end();) {
      if (it->conn->closed()) {
        it = attaches_.erase(it);
        continue;
      }
      Bytes body;
      Writer w(&body);
      w.Put<uint32_t>(static_cast<uint32_t>(it->items.size()));
      Status st;
      bool ready = true;
      for (auto& item : it->items) {
        Chunk* ch = FindChunk(item.chunk_id);
        if (!ch) {
          ready = false;
          break;
        }
        if (ch->numel != item.numel || ch->tensor != item.tensor || ch->offset != item.offset) {
          st = Status::InvalidArgument(fmt::format("chunk {} exists as {} elements of '{}'",
                                                   item.chunk_id, ch->numel, ch->tensor));
          break;
        }
        ChunkSlots slots;
        slots.key = ch->slots->remote_key();
        slots.slot_stride = ch->layout.stride;
        slots.version = ch->version.load();
        slots.Encode(&w);
      }
      if (!ready) {
        ++it;
        continue;
      }
      Reply(*it->conn, it->request, st, st.ok() ? body : Bytes{});
      it = attaches_.erase(it);
    }
  }

  Result<Chunk*> MakeChunk(const CreateChunkItem& it, const float* init) {
    auto ch = std::make_unique<Chunk>();
    ch->id = it.chunk_id;
    ch->tensor = it.tensor;
    ch->offset = it.offset;
    ch->numel = it.numel;
    ch->opt = it.optimizer;
    ch->layout = LayoutFor(it.numel);
    auto region = data_ctx_->AllocateRegion(ch->layout.stride * 2);
    if (!region.ok()) return region.status().WithContext("allocating chunk " + it.tensor);
    ch->slots = std::move(region).value();
    InitOptimizerState(ch->opt, it.numel, &ch->state);
    ch->last_seq.assign(view_.num_workers, 0);
    std::memcpy(ch->slots->data(), init, ch->layout.data_bytes);
    Seal(*ch, 0);
    Chunk* raw = ch.get();
    std::unique_lock<std::shared_mutex> lock(chunks_mu_);
    chunks_.emplace(it.chunk_id, std::move(ch));
    return raw;
  }

  void OnGrant(const std::shared_ptr<Connection>& c, uint64_t req, Reader& r) {
    uint64_t chunk_id = 0, bytes = 0;
    if (!r.Get(&chunk_id) || !r.Get(&bytes) || !r.done()) return Drop(c, "malformed grant request");
    Chunk* ch = FindChunk(chunk_id);
    if (!ch) return Reply(*c, req, Status::NotFound(fmt::format("unknown chunk {}", chunk_id)));
    if (bytes != ch->numel * 4)
      return Reply(*c, req,
                   Status::InvalidArgument(fmt::format("push of {} bytes into chunk {} of {} bytes",
                                                       bytes, chunk_id, ch->numel * 4)));
    std::weak_ptr<Connection> weak = c;
    grant_requests_++;
    bool waited = pool_.Request(c.get(), [this, weak, req](uint32_t buffer) {
      auto conn = weak.lock();
      if (!conn) return;
      Bytes body;
      Writer w(&body);
      EncodeGrant(&w, buffer);
      Reply(*conn, req, Status::OK(), body);
    });
    if (waited) grants_waited_++;
  }

  void EncodeGrant(Writer* w, uint32_t buffer) const {
    LandingGrant::Encode(w, buffer, static_cast<uint64_t>(buffer) * pool_.buffer_bytes(),
                         pool_.key());
  }

  void OnPushDone(const std::shared_ptr<Connection>& c, uint64_t req, Reader& r) {
    PushTask t;
    t.conn = c;
    t.request = req;
    if (!r.Get(&t.chunk_id) || !r.Get(&t.buffer) || !r.Get(&t.worker) || !r.Get(&t.seq) ||
        !r.done())
      return Drop(c, "malformed push notification");
    Chunk* ch = FindChunk(t.chunk_id);
    if (!ch) return Reply(*c, req, Status::NotFound(fmt::format("unknown chunk {}", t.chunk_id)));
    if (t.worker >= view_.num_workers)
      return Reply(*c, req, Status::InvalidArgument(fmt::format("unknown worker {}", t.worker)));
    if (!pool_.Claim(t.buffer, c.get()))
      return Drop(c, fmt::format("push names landing buffer {} that it does not hold", t.buffer));
    if (ch->numel * 4 <= kInlineApplyBytes) return ApplyPush(*ch, t);
    // The transport keeps polling until the apply thread hands it the acknowledgement.
    applier_.Post(t.chunk_id,
                  [this, ch, t, hold = data_ctx_->HoldPolling()] { ApplyPush(*ch, t); });
  }

  // The acknowledgement carries a landing buffer granted ahead for the worker's next push
  // when the pool can spare one (u8 1, then the grant; u8 0 when not).
  void AckNow(const Ack& a, uint64_t version) {
    Bytes body;
    Writer w(&body);
    w.Put(version);
    std::optional<uint32_t> ahead = pool_.GrantAhead(a.conn.get());
    w.Put<uint8_t>(ahead ? 1 : 0);
    if (ahead) {
      EncodeGrant(&w, *ahead);
      grants_ahead_++;
    }
    Reply(*a.conn, a.request, Status::OK(), body);
  }

  // Apply thread of `ch`.
  void ApplyPush(Chunk& ch, const PushTask& t) {
    const float* grad = pool_.data(t.buffer);
    Ack ack{t.conn, t.request};
    uint64_t& last = ch.last_seq[t.worker];
    if (t.seq <= last) {
      // A resent push: acknowledged, never applied twice.
      duplicates_++;
      pool_.Release(t.buffer);
      auto pending = ch.steps.find(t.seq);
      if (view_.mode == Mode::kSync && pending != ch.steps.end()) {
        pending->second.acks.push_back(ack);
      } else {
        AckNow(ack, ch.version.load());
      }
      return;
    }
    if (view_.mode == Mode::kAsync) {
      Update(ch, grad, nullptr, 1.0f);
      pool_.Release(t.buffer);
      last = t.seq;
      pushes_applied_++;
      AckNow(ack, ch.version.load());
      return;
    }
    // Too far ahead of the published version, or behind an earlier push of the same worker
    // that is waiting: wait too, keeping the landing buffer (the sender is held back).
    bool behind_own = std::any_of(ch.deferred.begin(), ch.deferred.end(),
                                  [&](const PushTask& d) { return d.worker == t.worker; });
    if (t.seq > ch.version.load() + kMaxStepsAhead || behind_own) {
      ch.deferred.push_back(t);
      return;
    }
    if (t.seq != last + 1) {
      pool_.Release(t.buffer);
      return Reply(
          *t.conn, t.request,
          Status::InvalidArgument(fmt::format("worker {} pushed step {} of chunk {} after step {}",
                                              t.worker, t.seq, ch.id, last)));
    }
    auto& step = ch.steps[t.seq];
    step.acks.push_back(ack);
    last = t.seq;
    pushes_applied_++;
    bool next_in_line = t.seq == ch.version.load() + 1;
    if (step.count + 1 == view_.num_workers && next_in_line) {
      // The step's last push: fold it straight into the update (no accumulator pass).
      Update(ch, step.count ? step.sum : grad, step.count ? grad : nullptr, Scale());
      pool_.Release(t.buffer);
      FinishStep(ch, ch.steps.find(t.seq));
      PublishReadySteps(ch);
      return;
    }
    if (step.count == 0) {
      if (next_in_line) {
        uint8_t* slot = NextSlot(ch);
        StampSlot(ch, slot, 0);  // no longer a valid version
        std::atomic_thread_fence(std::memory_order_seq_cst);
        step.sum = reinterpret_cast<float*>(slot);
      } else {
        if (!ch.spare.empty()) {
          step.own = std::move(ch.spare.back());
          ch.spare.pop_back();
        }
        step.own.resize(ch.numel);
        step.sum = step.own.data();
      }
      float* sum = step.sum;
      applier_.ParallelFor(ch.numel, kRangeElements, [&](size_t lo, size_t hi) {
        std::memcpy(sum + lo, grad + lo, (hi - lo) * sizeof(float));
      });
    } else {
      float* sum = step.sum;
      applier_.ParallelFor(ch.numel, kRangeElements,
                           [&](size_t lo, size_t hi) { Accumulate(sum + lo, grad + lo, hi - lo); });
    }
    step.count++;
    pool_.Release(t.buffer);
    PublishReadySteps(ch);
  }

  uint8_t* NextSlot(Chunk& ch) {
    return static_cast<uint8_t*>(ch.slots->data()) +
           ((ch.version.load() + 1) % 2) * ch.layout.stride;
  }

  float Scale() const {
    return view_.aggregate == Aggregate::kMean ? 1.0f / static_cast<float>(view_.num_workers)
                                               : 1.0f;
  }

  void FinishStep(Chunk& ch, std::map<uint64_t, Chunk::Step>::iterator it) {
    uint64_t v = ch.version.load();
    for (auto& a : it->second.acks) AckNow(a, v);
    if (!it->second.own.empty()) ch.spare.push_back(std::move(it->second.own));
    ch.steps.erase(it);
  }

  // Publishes every step that is complete and next in line, then retries pushes that were
  // too far ahead (each either lands now or waits again).
  void PublishReadySteps(Chunk& ch) {
    for (;;) {
      auto it = ch.steps.find(ch.version.load() + 1);
      if (it == ch.steps.end() || it->second.count < view_.num_workers) break;
      Update(ch, it->second.sum, nullptr, Scale());
      FinishStep(ch, it);
    }
    if (!ch.deferred.empty()) {
      std::deque<PushTask> again;
      again.swap(ch.deferred);
      for (auto& t : again) ApplyPush(ch, t);
    }
  }

  // Computes version v+1 from slot v % 2 into slot (v+1) % 2 and publishes it, seqlock style:
  // the slot's tag is zeroed before any of its bytes changes and set to the new version after
  // the last, so a reader that finds the tag it expected both before and after reading the
  // floats got one whole version (docs/protocol.md, "Published slots").
  void Update(Chunk& ch, const float* grad, const float* extra, float scale) {
    uint64_t v = ch.version.load();
    auto* base = static_cast<uint8_t*>(ch.slots->data());
    const auto* in = reinterpret_cast<const float*>(base + (v % 2) * ch.layout.stride);
    uint8_t* next = NextSlot(ch);
    StampSlot(ch, next, 0);
    std::atomic_thread_fence(std::memory_order_seq_cst);
    OptimizerStep step(ch.opt, scale, &ch.state);
    float* out = reinterpret_cast<float*>(next);
    applier_.ParallelFor(ch.numel, kRangeElements,
                         [&](size_t lo, size_t hi) { step.Run(in, out, grad, extra, lo, hi); });
    Seal(ch, v + 1);
    ch.version.store(v + 1);
  }

  // Writes a slot's tag (release): version + 1 when it holds that version, 0 while rewritten.
  static void StampSlot(Chunk& ch, uint8_t* slot, uint64_t tag) {
    reinterpret_cast<std::atomic<uint64_t>*>(slot + ch.layout.trailer_offset)
        ->store(tag, std::memory_order_release);
  }

  // Stamps slot v % 2 as holding version v (release: every byte of it is written before).
  void Seal(Chunk& ch, uint64_t v) {
    uint8_t* slot = static_cast<uint8_t*>(ch.slots->data()) + (v % 2) * ch.layout.stride;
    StampSlot(ch, slot, v + 1);
    versions_++;
  }

  ServerOptions opt_;
  std::unique_ptr<transport::Context> data_ctx_;
  std::unique_ptr<transport::Context> control_ctx_;
  std::unique_ptr<transport::Listener> listener_;
  std::unique_ptr<NodeClient> node_;
  std::shared_ptr<Done> done_ = std::make_shared<Done>();
  ClusterView view_;
  uint32_t rank_ = 0;
  LandingPool pool_;
  Applier applier_;

  std::mutex ready_mu_;
  std::atomic<bool> ready_{false};  // set on the loop thread
  std::vector<std::pair<std::shared_ptr<Connection>, transport::Message>> early_;  // ready_mu_

  struct Attach {
    std::shared_ptr<Connection> conn;
    uint64_t request = 0;
    std::vector<CreateChunkItem> items;
  };
  std::vector<Attach> attaches_;  // loop thread only

  mutable std::shared_mutex chunks_mu_;
  std::unordered_map<uint64_t, std::unique_ptr<Chunk>> chunks_;

  std::atomic<uint64_t> pushes_applied_{0};
  std::atomic<uint64_t> duplicates_{0};
  std::atomic<uint64_t> versions_{0};
  std::atomic<uint64_t> grant_requests_{0};
  std::atomic<uint64_t> grants_waited_{0};
  std::atomic<uint64_t> grants_ahead_{0};
};

}  // namespace
}  // namespace server

Result<std::unique_ptr<Server>> Server::Start(const ServerOptions& options) {
  SHARDPS_RETURN_IF_ERROR(options.Validate());
  auto s = std::make_unique<server::ServerImpl>(options);
  SHARDPS_RETURN_IF_ERROR(s->Init());
  return std::unique_ptr<Server>(std::move(s));
}

}  // namespace shardps
