// The CPU node reducer: POSIX shared memory between the worker processes of one host
// (docs/node-reduction.md).
#include <fcntl.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <climits>
#include <cstring>
#include <ctime>
#include <deque>
#include <mutex>
#include <string>
#include <thread>

#include <fmt/format.h>

#include "core/checksum.h"
#include "gpu/cuda.h"
#include "worker/node_reducer.h"

namespace shardps::worker {

std::vector<uint32_t> SplitChunks(const std::vector<uint64_t>& chunk_numels,
                                  std::vector<uint64_t>* load) {
  std::vector<uint32_t> owner;
  owner.reserve(chunk_numels.size());
  for (uint64_t n : chunk_numels) {
    const auto least = std::min_element(load->begin(), load->end());
    owner.push_back(static_cast<uint32_t>(least - load->begin()));
    *least += n;
  }
  return owner;
}

namespace {

constexpr uint64_t kMagic = 0x5348415244505331ull;  // "SHARDPS1"
constexpr uint64_t kAlign = 64;
// A lane's kind when its worker gave the operation up before it handed its gradient in.
constexpr uint64_t kAbandoned = 0;

uint64_t Round(uint64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

struct alignas(64) SegmentHeader {
  uint64_t magic;
  uint64_t layout;  // a checksum of what the creator laid out
  uint64_t bytes;
  std::atomic<uint32_t> ready;     // the creator filled the header
  std::atomic<uint32_t> attached;  // workers that mapped it
  std::atomic<uint32_t> bell;      // the bell segment's: rung on every phase change
};

// One worker's progress through a tensor's operations; written by that worker only.
struct alignas(64) Lane {
  std::atomic<uint64_t> arrived;   // the operation whose gradient it handed in
  std::atomic<uint64_t> kind;      // that operation's NodeOpKind
  std::atomic<uint64_t> done;      // the operation whose share it finished
  std::atomic<uint64_t> failed;    // the last operation whose share failed
  std::atomic<uint64_t> version;   // the lowest version its share saw (done's)
  std::atomic<uint64_t> finished;  // the operation it copied out and freed
};

static_assert(sizeof(Lane) == 64);
static_assert(std::atomic<uint64_t>::is_always_lock_free &&
                  std::atomic<uint32_t>::is_always_lock_free,
              "lanes are shared between processes");

// A mapped segment; the creator removes its name once every worker mapped it.
class Segment {
 public:
  Segment() = default;
  Segment(const Segment&) = delete;
  Segment& operator=(const Segment&) = delete;
  ~Segment() {
    if (base_) munmap(base_, bytes_);
    if (!name_.empty()) shm_unlink(name_.c_str());  // nobody attached in time
  }

  // Local rank 0 creates it, the others open it once it exists; then everyone waits until
  // all `workers` mapped it (the creator removes the name then).
  Status Attach(const std::string& name, uint64_t bytes, uint64_t layout, bool create,
                uint32_t workers, std::chrono::milliseconds timeout, const char* differs) {
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    int fd = -1;
    if (create) {
      fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
      if (fd < 0)
        return Status::Internal(
            fmt::format("cannot create shared memory {}: {}", name, std::strerror(errno)));
      name_ = name;
      // Reserved now, so that a full /dev/shm is this error rather than a SIGBUS later.
      if (int e = posix_fallocate(fd, 0, static_cast<off_t>(bytes)); e != 0) {
        close(fd);
        return Status::ResourceExhausted(fmt::format(
            "cannot reserve {} bytes of shared memory for node-level reduction ({}): {} (a "
            "container's /dev/shm may be too small: docker --shm-size)",
            bytes, name, std::strerror(e)));
      }
    } else {
      for (;;) {
        fd = shm_open(name.c_str(), O_RDWR, 0600);
        struct stat st {};
        if (fd >= 0 && fstat(fd, &st) == 0 && static_cast<uint64_t>(st.st_size) >= bytes) break;
        if (fd >= 0) close(fd);
        fd = -1;
        if (std::chrono::steady_clock::now() > deadline)
          return Status::Timeout(
              fmt::format("local rank 0 of this node did not create shared memory {} within {} "
                          "ms (do the node's workers declare the same tensors?)",
                          name, timeout.count()));
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED)
      return Status::Internal(fmt::format("cannot map {}: {}", name, std::strerror(errno)));
    base_ = static_cast<uint8_t*>(p);
    bytes_ = bytes;
    auto* h = header();
    if (create) {
      h->magic = kMagic;
      h->layout = layout;
      h->bytes = bytes;
      h->ready.store(1, std::memory_order_release);
    } else {
      while (h->ready.load(std::memory_order_acquire) == 0) {
        if (std::chrono::steady_clock::now() > deadline)
          return Status::Timeout(fmt::format("shared memory {} was never filled in", name));
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
      if (h->magic != kMagic || h->layout != layout || h->bytes != bytes)
        return Status::InvalidArgument(
            fmt::format("the workers of this node {} ({} holds another layout)", differs, name));
    }
    h->attached.fetch_add(1, std::memory_order_acq_rel);
    while (h->attached.load(std::memory_order_acquire) < workers) {
      if (std::chrono::steady_clock::now() > deadline)
        return Status::Timeout(
            fmt::format("only {} of the node's {} workers attached shared memory {} within {} ms",
                        h->attached.load(), workers, name, timeout.count()));
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
    if (create) {
      shm_unlink(name_.c_str());
      name_.clear();
    }
    return Status::OK();
  }

  SegmentHeader* header() const { return reinterpret_cast<SegmentHeader*>(base_); }
  uint8_t* base() const { return base_; }

 private:
  std::string name_;  // set while this process must remove it
  uint8_t* base_ = nullptr;
  uint64_t bytes_ = 0;
};

// NCCL's part of the bell segment: the communicator's id, and the order of the collectives that
// local rank 0 appends and every worker issues in turn.
constexpr uint32_t kQueue = 4096;
constexpr uint32_t kMaxLocal = 1024;
enum Collective : uint32_t { kReduceToOwners = 1, kBroadcastFromOwners = 2 };
struct QueueEntry {
  std::atomic<uint32_t> tensor;
  std::atomic<uint32_t> what;  // Collective
  std::atomic<uint64_t> seq;
};
struct alignas(64) Control {
  std::atomic<uint32_t> id_ready;
  uint8_t id[gpu::Nccl::kIdBytes];
  alignas(64) std::atomic<uint64_t> tail;  // entries appended by local rank 0
  QueueEntry entries[kQueue];
  alignas(64) std::atomic<uint64_t> cursor[kMaxLocal];  // per local rank: entries issued
};

// A tensor's place in a segment: K lanes, then (CPU reducer) K gradients and the gathered
// parameters.
struct Area {
  uint64_t numel = 0;
  Lane* lanes = nullptr;
  std::vector<float*> grads;  // per local rank
  float* gather = nullptr;
};

class ShmNodeReducer : public NodeReducer {
 public:
  // `lanes_only`: the segments hold the lanes, not the data (the NCCL reducer's).
  ShmNodeReducer(uint64_t job, uint32_t node, uint32_t local_rank, uint32_t local_size,
                 bool lanes_only = false)
      : job_(job), node_(node), rank_(local_rank), size_(local_size), lanes_only_(lanes_only) {}

  Status Init(std::chrono::milliseconds timeout) {
    const uint64_t what[] = {size_, lanes_only_ ? 1u : 0u};
    return bell_.Attach(Name("bell"), Round(sizeof(SegmentHeader)) + sizeof(Control),
                        Checksum(what, sizeof(what)), rank_ == 0, size_, timeout,
                        "chose different node reducers (shared memory, NCCL) or sizes");
  }

  uint32_t local_rank() const override { return rank_; }
  uint32_t local_size() const override { return size_; }
  const char* name() const override { return "shared memory"; }

  Status AddTensors(uint32_t first, const std::vector<NodeTensor>& tensors, uint64_t key,
                    std::chrono::milliseconds timeout) override {
    if (first != Count())
      return Status::Internal(
          fmt::format("node reducer: tensor {} added after {}", first, Count()));
    std::vector<uint64_t> what{size_, key, lanes_only_ ? 1u : 0u};
    uint64_t bytes = Round(sizeof(SegmentHeader));
    for (const NodeTensor& t : tensors) {
      what.push_back(t.numel);
      bytes += Round(sizeof(Lane) * size_) + (lanes_only_ ? 0 : (size_ + 1) * Round(t.numel * 4));
    }
    auto seg = std::make_unique<Segment>();
    SHARDPS_RETURN_IF_ERROR(seg->Attach(Name(fmt::format("d{}", segments_.size())), bytes,
                                        Checksum(what.data(), what.size() * 8), rank_ == 0, size_,
                                        timeout, "declared different tensors"));
    uint8_t* p = seg->base() + Round(sizeof(SegmentHeader));
    std::lock_guard<std::mutex> lock(mu_);
    for (const NodeTensor& t : tensors) {
      Area& a = *areas_.emplace_back(std::make_unique<Area>());
      a.numel = t.numel;
      a.lanes = reinterpret_cast<Lane*>(p);
      p += Round(sizeof(Lane) * size_);
      if (lanes_only_) continue;
      for (uint32_t k = 0; k < size_; ++k) {
        a.grads.push_back(reinterpret_cast<float*>(p));
        p += Round(t.numel * 4);
      }
      a.gather = reinterpret_cast<float*>(p);
      p += Round(t.numel * 4);
    }
    segments_.push_back(std::move(seg));
    return Status::OK();
  }

  bool Free(uint32_t t, uint64_t seq) override {
    const Area& a = At(t);
    for (uint32_t k = 0; k < size_; ++k)
      if (a.lanes[k].finished.load(std::memory_order_acquire) + 1 < seq) return false;
    return true;
  }

  Status Contribute(uint32_t t, uint64_t seq, NodeOpKind kind, const float* grad) override {
    Area& a = At(t);
    std::memcpy(a.grads[rank_], grad, a.numel * 4);
    Arrive(t, seq, kind);
    return Status::OK();
  }

  Result<const float*> Reduce(uint32_t t, uint64_t seq,
                              std::span<const std::pair<uint64_t, uint64_t>> mine) override {
    SHARDPS_ASSIGN_OR_RETURN(bool all, AllArrived(t, seq));
    if (!all) return nullptr;
    Area& a = At(t);
    // The sum of every worker's gradient in local-rank order, written over this worker's own
    // (nobody else reads this worker's gradient in the ranges it owns).
    float* dst = a.grads[rank_];
    constexpr uint64_t kBlock = 2048;
    float acc[kBlock];
    for (auto [begin, end] : mine) {
      for (uint64_t b = begin; b < end; b += kBlock) {
        const uint64_t n = std::min(kBlock, end - b);
        std::memcpy(acc, a.grads[0] + b, n * 4);
        for (uint32_t k = 1; k < size_; ++k) {
          const float* g = a.grads[k] + b;
          for (uint64_t i = 0; i < n; ++i) acc[i] += g[i];
        }
        std::memcpy(dst + b, acc, n * 4);
      }
    }
    return static_cast<const float*>(dst);
  }

  float* Gather(uint32_t t) override { return At(t).gather; }

  void ShareDone(uint32_t t, uint64_t seq, bool ok, uint64_t version) override {
    Lane& l = At(t).lanes[rank_];
    l.version.store(version, std::memory_order_relaxed);
    if (!ok) l.failed.store(seq, std::memory_order_relaxed);
    l.done.store(seq, std::memory_order_release);
    Ring();
  }

  std::optional<NodeShares> Shares(uint32_t t, uint64_t seq) override {
    const Area& a = At(t);
    NodeShares s;
    for (uint32_t k = 0; k < size_; ++k) {
      const Lane& l = a.lanes[k];
      if (l.done.load(std::memory_order_acquire) < seq) return std::nullopt;
      if (l.failed.load(std::memory_order_relaxed) == seq) s.failed.push_back(k);
      s.version = std::min(s.version, l.version.load(std::memory_order_relaxed));
    }
    return s;
  }

  Result<bool> Finish(uint32_t t, uint64_t seq, float* out) override {
    Area& a = At(t);
    if (out) std::memcpy(out, a.gather, a.numel * 4);
    MarkFinished(t, seq);
    return true;
  }

  void Abandon(uint32_t t, uint64_t seq) override {
    Lane& l = At(t).lanes[rank_];
    // Whoever checks the kinds after this sees it given up, whether or not its gradient was in.
    l.kind.store(kAbandoned, std::memory_order_relaxed);
    l.arrived.store(seq, std::memory_order_release);
    l.version.store(UINT64_MAX, std::memory_order_relaxed);
    l.failed.store(seq, std::memory_order_relaxed);
    l.done.store(seq, std::memory_order_release);
    l.finished.store(seq, std::memory_order_release);
    Ring();
  }

  std::vector<uint32_t> Missing(uint32_t t, uint64_t seq, NodePhase phase) override {
    const Area& a = At(t);
    std::vector<uint32_t> out;
    for (uint32_t k = 0; k < size_; ++k) {
      const Lane& l = a.lanes[k];
      const uint64_t at = phase == NodePhase::kFree          ? l.finished.load() + 1
                          : phase == NodePhase::kContributed ? l.arrived.load()
                          : phase == NodePhase::kShareDone   ? l.done.load()
                                                             : l.finished.load();
      if (at < seq) out.push_back(k);
    }
    return out;
  }

  uint32_t Bell() const override { return header().bell.load(std::memory_order_acquire); }

  void Ring() override {
    auto* b = &header().bell;
    b->fetch_add(1, std::memory_order_acq_rel);
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(b), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
  }

  void WaitBell(uint32_t seen, std::chrono::microseconds timeout) override {
    auto* b = &header().bell;
    if (b->load(std::memory_order_acquire) != seen) return;
    timespec ts{};
    ts.tv_sec = static_cast<time_t>(timeout.count() / 1000000);
    ts.tv_nsec = static_cast<long>(timeout.count() % 1000000 * 1000);
    // A shared (not private) futex: the node's other processes wake it.
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(b), FUTEX_WAIT, seen, &ts, nullptr, 0);
  }

 protected:
  // This worker's gradient of operation `seq` is in.
  void Arrive(uint32_t t, uint64_t seq, NodeOpKind kind) {
    Lane& l = At(t).lanes[rank_];
    l.kind.store(static_cast<uint64_t>(kind), std::memory_order_relaxed);
    l.arrived.store(seq, std::memory_order_release);
    Ring();
  }

  // Whether every worker's gradient of operation `seq` is in; an error when they started
  // different operations as it, or one gave it up.
  Result<bool> AllArrived(uint32_t t, uint64_t seq) {
    const Area& a = At(t);
    for (uint32_t k = 0; k < size_; ++k)
      if (a.lanes[k].arrived.load(std::memory_order_acquire) < seq) return false;
    const uint64_t kind = a.lanes[rank_].kind.load(std::memory_order_relaxed);
    for (uint32_t k = 0; k < size_; ++k) {
      const uint64_t other = a.lanes[k].kind.load(std::memory_order_relaxed);
      if (other == kAbandoned)
        return Status::Aborted(
            fmt::format("local rank {} of node {} gave operation {} of the tensor up (see its log)",
                        k, node_, seq));
      if (other != kind)
        return Status::InvalidArgument(fmt::format(
            "the workers of node {} issued different operations as operation {} of a tensor: "
            "local rank {} a {}, local rank {} a {} (every worker of a node pushes, or "
            "push_pulls, each tensor in the same order)",
            node_, seq, rank_, kind == 1 ? "push" : "push_pull", k,
            other == 1 ? "push" : "push_pull"));
    }
    return true;
  }

  void MarkFinished(uint32_t t, uint64_t seq) {
    At(t).lanes[rank_].finished.store(seq, std::memory_order_release);
    Ring();
  }

  SegmentHeader& header() const { return *reinterpret_cast<SegmentHeader*>(bell_.base()); }
  Control& control() const {
    return *reinterpret_cast<Control*>(bell_.base() + Round(sizeof(SegmentHeader)));
  }

  // A tensor's area: added by the thread that declares, read by the one that polls.
  Area& At(uint32_t t) {
    std::lock_guard<std::mutex> lock(mu_);
    return *areas_[t];
  }
  size_t Count() {
    std::lock_guard<std::mutex> lock(mu_);
    return areas_.size();
  }

  std::string Name(const std::string& what) const {
    return fmt::format("/shardps-{:016x}-n{}-{}", job_, node_, what);
  }

  const uint64_t job_;
  const uint32_t node_, rank_, size_;
  const bool lanes_only_;
  Segment bell_;
  std::vector<std::unique_ptr<Segment>> segments_;  // the declaring thread's
  std::mutex mu_;
  std::vector<std::unique_ptr<Area>> areas_;  // by tensor id; guarded by mu_
};

// The calling thread's current device becomes the reducer's GPU (as a training program sets it
// anyway): restoring another would make a context on it.

// The NCCL reducer (node_reducer.h). Per tensor it holds, on the worker's GPU, the gradient
// (reduced in place to each chunk's owner) and the gathered parameters (broadcast from each
// chunk's owner), and in pinned host memory this worker's share of both (what it pushes and
// pulls). Collectives are issued by every worker in the order of the queue local rank 0 appends
// to (Progress): a reduce once every worker's gradient of an operation is in, a broadcast once
// every share is done; NCCL needs every GPU to issue the same collectives in the same order,
// which the workers' own order of operations on different tensors does not give.
class NcclNodeReducer final : public ShmNodeReducer {
 public:
  NcclNodeReducer(uint64_t job, uint32_t node, uint32_t local_rank, uint32_t local_size,
                  std::shared_ptr<gpu::Cuda> cuda, std::unique_ptr<gpu::Nccl> nccl)
      : ShmNodeReducer(job, node, local_rank, local_size, true),
        cuda_(std::move(cuda)),
        nccl_(std::move(nccl)) {}

  ~NcclNodeReducer() override {
    // Aborted, not destroyed: destroying waits for collectives that a closing node mate may
    // never issue.
    if (comm_) nccl_->Abort(comm_);
    for (auto& d : dev_) Release(d);
    cuda_->DestroyStream(stream_);
  }

  Status InitNccl(std::chrono::milliseconds timeout) {
    if (size_ > kMaxLocal)
      return Status::InvalidArgument(
          fmt::format("NCCL node reducer: at most {} workers per node", kMaxLocal));
    device_ = static_cast<int>(rank_ % static_cast<uint32_t>(cuda_->device_count()));
    SHARDPS_RETURN_IF_ERROR(cuda_->SetDevice(device_));
    SHARDPS_ASSIGN_OR_RETURN(stream_, cuda_->CreateStream());
    Control& c = control();
    if (rank_ == 0) {
      SHARDPS_RETURN_IF_ERROR(nccl_->UniqueId(c.id));
      c.id_ready.store(1, std::memory_order_release);
    } else {
      const auto deadline = std::chrono::steady_clock::now() + timeout;
      while (c.id_ready.load(std::memory_order_acquire) == 0) {
        if (std::chrono::steady_clock::now() > deadline)
          return Status::Timeout("local rank 0 did not hand out NCCL's id");
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      }
    }
    SHARDPS_ASSIGN_OR_RETURN(comm_,
                             nccl_->Join(static_cast<int>(size_), c.id, static_cast<int>(rank_)));
    // Nonblocking: a node mate that died after attaching the shared memory is a timeout here.
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      auto ready = nccl_->Ready(comm_);
      if (!ready.ok()) return ready.status().WithContext("setting NCCL up");
      if (*ready) return Status::OK();
      if (std::chrono::steady_clock::now() > deadline)
        return Status::Timeout(
            fmt::format("NCCL's communicator of the node's {} GPUs was not set up within {} ms",
                        size_, timeout.count()));
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    }
  }

  const char* name() const override { return "NCCL"; }
  bool TakesDevicePointers() const override { return true; }
  void OnThread() override { (void)cuda_->SetDevice(device_); }

  Status AddTensors(uint32_t first, const std::vector<NodeTensor>& tensors, uint64_t key,
                    std::chrono::milliseconds timeout) override {
    SHARDPS_RETURN_IF_ERROR(cuda_->SetDevice(device_));
    std::vector<Dev> added;
    auto undo = [&] {
      for (auto& d : added) Release(d);
    };
    for (const NodeTensor& t : tensors) {
      Dev& d = added.emplace_back();
      d.tensor = t;
      const size_t bytes = t.numel * 4;
      auto grad = cuda_->DeviceAlloc(bytes);
      auto sums = grad.ok() ? cuda_->DeviceAlloc(bytes) : grad;
      auto gather = sums.ok() ? cuda_->DeviceAlloc(bytes) : sums;
      auto sum = gather.ok() ? cuda_->HostAlloc(bytes) : gather;
      auto pulled = sum.ok() ? cuda_->HostAlloc(bytes) : sum;
      auto event = pulled.ok() ? cuda_->CreateEvent() : Result<gpu::Event>(pulled.status());
      d.grad = grad.ok() ? static_cast<float*>(*grad) : nullptr;
      d.sums = sums.ok() ? static_cast<float*>(*sums) : nullptr;
      d.gather = gather.ok() ? static_cast<float*>(*gather) : nullptr;
      d.sum = sum.ok() ? static_cast<float*>(*sum) : nullptr;
      d.pulled = pulled.ok() ? static_cast<float*>(*pulled) : nullptr;
      d.event = event.ok() ? *event : nullptr;
      if (!event.ok()) {
        undo();
        return event.status().WithContext(
            fmt::format("NCCL node reducer: memory for a tensor of {} floats", t.numel));
      }
    }
    Status st = ShmNodeReducer::AddTensors(first, tensors, key, timeout);
    if (!st.ok()) {
      undo();
      return st;
    }
    std::lock_guard<std::mutex> lock(dev_mu_);
    for (auto& d : added) dev_.push_back(std::move(d));
    return Status::OK();
  }

  Status Contribute(uint32_t t, uint64_t seq, NodeOpKind kind, const float* grad) override {
    Dev& d = DevOf(t);
    // Copied before the lane says so: the collective reads the reducer's copy, never the
    // caller's buffer (which an operation given up may free).
    SHARDPS_RETURN_IF_ERROR(cuda_->Copy(d.grad, grad, d.tensor.numel * 4));
    d.kind = kind;
    Arrive(t, seq, kind);
    return Status::OK();
  }

  Result<const float*> Reduce(uint32_t t, uint64_t seq,
                              std::span<const std::pair<uint64_t, uint64_t>> mine) override {
    SHARDPS_ASSIGN_OR_RETURN(bool all, AllArrived(t, seq));
    if (!all) return nullptr;
    Dev& d = DevOf(t);
    if (rank_ == 0 && d.reduce_queued != seq) {
      if (!Append(t, kReduceToOwners, seq)) return nullptr;  // the queue is full: later
      d.reduce_queued = seq;
    }
    Progress();
    SHARDPS_RETURN_IF_ERROR(failure_);
    if (d.reduced != seq) return nullptr;
    SHARDPS_ASSIGN_OR_RETURN(bool done, cuda_->Done(d.event));
    if (!done) return nullptr;
    for (auto [begin, end] : mine)
      SHARDPS_RETURN_IF_ERROR(cuda_->Copy(d.sum + begin, d.sums + begin, (end - begin) * 4));
    return static_cast<const float*>(d.sum);
  }

  float* Gather(uint32_t t) override { return DevOf(t).pulled; }

  std::optional<NodeShares> Shares(uint32_t t, uint64_t seq) override {
    auto s = ShmNodeReducer::Shares(t, seq);
    if (!s) return s;
    Dev& d = DevOf(t);
    // The broadcast follows a reduce of push_pulls, whatever the shares' fate, so that every
    // GPU issues it.
    if (rank_ == 0 && d.reduce_queued == seq && d.gather_queued != seq && Gathers(d)) {
      if (!Append(t, kBroadcastFromOwners, seq)) return std::nullopt;  // full: later
      d.gather_queued = seq;
    }
    Progress();
    return s;
  }

  Result<bool> Finish(uint32_t t, uint64_t seq, float* out) override {
    Dev& d = DevOf(t);
    Progress();
    if (d.reduced == seq && Gathers(d)) {
      if (!failure_.ok()) {
        MarkFinished(t, seq);
        return failure_;
      }
      if (d.gathered != seq) return false;
      auto done = cuda_->Done(d.event);
      if (!done.ok() || !*done) {
        if (done.ok()) return false;
        MarkFinished(t, seq);
        return done.status();
      }
      if (out) {
        Status st = cuda_->Copy(out, d.gather, d.tensor.numel * 4);
        if (!st.ok()) {
          MarkFinished(t, seq);
          return st;
        }
      }
    }
    MarkFinished(t, seq);
    return true;
  }

  // Issues the queue's collectives this worker has not issued yet, in order.
  void Progress() override {
    Control& c = control();
    while (failure_.ok() && comm_) {
      if (pending_) {
        // A group NCCL was still queueing (nonblocking): nothing else on the communicator
        // before it is done.
        auto ready = nccl_->Ready(comm_);
        if (!ready.ok()) {
          failure_ = ready.status();
          break;
        }
        if (!*ready) break;
        failure_ = Issued(*pending_);
        pending_.reset();
        continue;
      }
      if (cursor_ >= c.tail.load(std::memory_order_acquire)) break;
      const QueueEntry& e = c.entries[cursor_ % kQueue];
      Entry next{e.tensor.load(std::memory_order_relaxed), e.what.load(std::memory_order_relaxed),
                 e.seq.load(std::memory_order_relaxed)};
      auto queued = Issue(next);
      if (!queued.ok()) {
        failure_ = queued.status();
        break;
      }
      if (*queued) {
        failure_ = Issued(next);
      } else {
        pending_ = next;
      }
    }
    if (failure_.ok() && comm_) failure_ = nccl_->AsyncError(comm_);
  }

  void Abandon(uint32_t t, uint64_t seq) override {
    ShmNodeReducer::Abandon(t, seq);
    // Local rank 0 still orders the broadcast that its node mates expect after a push_pull's
    // reduce, so that none of them waits for it in vain.
    Dev& d = DevOf(t);
    if (rank_ == 0 && d.reduce_queued == seq && d.gather_queued != seq && Gathers(d) &&
        Append(t, kBroadcastFromOwners, seq))
      d.gather_queued = seq;
  }

  void Abort() override {
    if (comm_) {
      nccl_->Abort(comm_);
      comm_ = nullptr;
      if (failure_.ok()) failure_ = Status::Aborted("NCCL stopped: the job failed");
    }
  }

 private:
  struct Dev {
    NodeTensor tensor;
    float* grad = nullptr;  // device: this worker's gradient
    float* sums = nullptr;  // device: the owner's sums (not over the gradient: the reduce of an
                            // operation given up may still run while the next one's comes in)
    NodeOpKind kind = NodeOpKind::kPush;  // this worker's last contributed operation
    float* gather = nullptr;              // device: the gathered parameters
    float* sum = nullptr;     // pinned: this worker's share of the sums, pushed from here
    float* pulled = nullptr;  // pinned: this worker's share of the parameters, pulled here
    gpu::Event event = nullptr;
    uint64_t reduced = 0, gathered = 0;             // collectives issued here, by operation
    uint64_t reduce_queued = 0, gather_queued = 0;  // local rank 0: appended to the queue
  };

  void Release(Dev& d) const {
    cuda_->DeviceFree(d.grad);
    cuda_->DeviceFree(d.sums);
    cuda_->DeviceFree(d.gather);
    cuda_->HostFree(d.sum);
    cuda_->HostFree(d.pulled);
    cuda_->DestroyEvent(d.event);
  }

  Dev& DevOf(uint32_t t) {
    std::lock_guard<std::mutex> lock(dev_mu_);
    return dev_[t];
  }

  // Push_pulls gather the parameters back; pushes do not. This worker's own kind: once the
  // reduce was issued, every worker's was the same.
  static bool Gathers(const Dev& d) { return d.kind == NodeOpKind::kPushPull; }

  // Local rank 0: appends a collective; false while the slowest worker is a whole queue behind.
  bool Append(uint32_t t, uint32_t what, uint64_t seq) {
    Control& c = control();
    const uint64_t tail = c.tail.load(std::memory_order_relaxed);
    for (uint32_t k = 0; k < size_; ++k)
      if (tail - c.cursor[k].load(std::memory_order_acquire) >= kQueue) return false;
    QueueEntry& e = c.entries[tail % kQueue];
    e.tensor.store(t, std::memory_order_relaxed);
    e.what.store(what, std::memory_order_relaxed);
    e.seq.store(seq, std::memory_order_relaxed);
    c.tail.store(tail + 1, std::memory_order_release);
    Ring();
    return true;
  }

  struct Entry {
    uint32_t tensor = 0;
    uint32_t what = 0;  // Collective
    uint64_t seq = 0;
  };

  // Queues entry `e`'s collectives on the stream: true once NCCL did, false while it still is
  // (Progress polls, then calls Issued).
  Result<bool> Issue(const Entry& e) {
    Dev& d = DevOf(e.tensor);
    if (e.what == kBroadcastFromOwners) {
      // This worker's pulled share onto the GPU, then every owner's share to everyone.
      for (const NodeChunk& ch : d.tensor.chunks)
        if (ch.owner == rank_)
          SHARDPS_RETURN_IF_ERROR(
              cuda_->CopyAsync(d.gather + ch.offset, d.pulled + ch.offset, ch.numel * 4, stream_));
    }
    SHARDPS_RETURN_IF_ERROR(nccl_->GroupStart());
    Status st;
    for (const NodeChunk& ch : d.tensor.chunks) {
      st = e.what == kReduceToOwners
               ? nccl_->ReduceSum(d.grad + ch.offset, d.sums + ch.offset, ch.numel,
                                  static_cast<int>(ch.owner), comm_, stream_)
               : nccl_->Broadcast(d.gather + ch.offset, ch.numel, static_cast<int>(ch.owner), comm_,
                                  stream_);
      if (!st.ok()) break;
    }
    auto end = nccl_->GroupEnd();
    SHARDPS_RETURN_IF_ERROR(st);
    return end;
  }

  // Entry `e`'s collectives are on the stream: the event follows them; the next entry's turn.
  Status Issued(const Entry& e) {
    Dev& d = DevOf(e.tensor);
    SHARDPS_RETURN_IF_ERROR(cuda_->Record(d.event, stream_));
    (e.what == kReduceToOwners ? d.reduced : d.gathered) = e.seq;
    Control& c = control();
    ++cursor_;
    c.cursor[rank_].store(cursor_, std::memory_order_release);
    Ring();
    return Status::OK();
  }

  std::shared_ptr<gpu::Cuda> cuda_;
  std::unique_ptr<gpu::Nccl> nccl_;
  int device_ = 0;
  gpu::Stream stream_ = nullptr;
  gpu::Comm comm_ = nullptr;
  uint64_t cursor_ = 0;           // queue entries issued (the driving thread's)
  std::optional<Entry> pending_;  // an entry NCCL is still queueing
  Status failure_;                // a collective that failed: every later operation fails
  std::mutex dev_mu_;
  std::deque<Dev> dev_;  // by tensor id; guarded by dev_mu_ (references stay valid)
};

}  // namespace

Result<std::unique_ptr<NodeReducer>> CreateShmNodeReducer(uint64_t job, uint32_t node,
                                                          uint32_t local_rank, uint32_t local_size,
                                                          std::chrono::milliseconds timeout) {
  if (local_size < 2 || local_rank >= local_size)
    return Status::InvalidArgument(
        fmt::format("local rank {} of {} workers is no node to reduce on", local_rank, local_size));
  auto r = std::make_unique<ShmNodeReducer>(job, node, local_rank, local_size);
  SHARDPS_RETURN_IF_ERROR(r->Init(timeout));
  return std::unique_ptr<NodeReducer>(std::move(r));
}

Result<std::unique_ptr<NodeReducer>> CreateNcclNodeReducer(uint64_t job, uint32_t node,
                                                           uint32_t local_rank, uint32_t local_size,
                                                           std::shared_ptr<gpu::Cuda> cuda,
                                                           std::chrono::milliseconds timeout) {
  if (local_size < 2 || local_rank >= local_size)
    return Status::InvalidArgument(
        fmt::format("local rank {} of {} workers is no node to reduce on", local_rank, local_size));
  if (!cuda) return Status::NotFound("no CUDA runtime with a visible GPU");
  SHARDPS_ASSIGN_OR_RETURN(auto nccl, gpu::Nccl::Load());
  if (static_cast<uint32_t>(cuda->device_count()) < local_size)
    return Status::NotFound(
        fmt::format("NCCL needs a GPU for each of the node's {} workers; {} visible", local_size,
                    cuda->device_count()));
  auto r = std::make_unique<NcclNodeReducer>(job, node, local_rank, local_size, std::move(cuda),
                                             std::move(nccl));
  SHARDPS_RETURN_IF_ERROR(r->Init(timeout));
  SHARDPS_RETURN_IF_ERROR(r->InitNccl(timeout));
  return std::unique_ptr<NodeReducer>(std::move(r));
}

}  // namespace shardps::worker
