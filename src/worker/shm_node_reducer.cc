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
                uint32_t workers, std::chrono::milliseconds timeout) {
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
        return Status::InvalidArgument(fmt::format(
            "the workers of this node declared different tensors ({} holds another layout)", name));
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

// A tensor's place in a segment: K lanes, K gradients, the gathered parameters.
struct Area {
  uint64_t numel = 0;
  Lane* lanes = nullptr;
  std::vector<float*> grads;  // per local rank
  float* gather = nullptr;
};

class ShmNodeReducer final : public NodeReducer {
 public:
  ShmNodeReducer(uint64_t job, uint32_t node, uint32_t local_rank, uint32_t local_size)
      : job_(job), node_(node), rank_(local_rank), size_(local_size) {}

  Status Init(std::chrono::milliseconds timeout) {
    const uint64_t layout = Checksum(&size_, sizeof(size_));
    return bell_.Attach(Name("bell"), sizeof(SegmentHeader), layout, rank_ == 0, size_, timeout);
  }

  uint32_t local_rank() const override { return rank_; }
  uint32_t local_size() const override { return size_; }

  Status AddTensors(uint32_t first, const std::vector<uint64_t>& numels,
                    std::chrono::milliseconds timeout) override {
    if (first != Count())
      return Status::Internal(
          fmt::format("node reducer: tensor {} added after {}", first, Count()));
    std::vector<uint64_t> what{size_};
    uint64_t bytes = Round(sizeof(SegmentHeader));
    for (uint64_t n : numels) {
      what.push_back(n);
      bytes += Round(sizeof(Lane) * size_) + (size_ + 1) * Round(n * 4);
    }
    auto seg = std::make_unique<Segment>();
    SHARDPS_RETURN_IF_ERROR(seg->Attach(Name(fmt::format("d{}", segments_.size())), bytes,
                                        Checksum(what.data(), what.size() * 8), rank_ == 0, size_,
                                        timeout));
    uint8_t* p = seg->base() + Round(sizeof(SegmentHeader));
    std::lock_guard<std::mutex> lock(mu_);
    for (uint64_t n : numels) {
      Area& a = *areas_.emplace_back(std::make_unique<Area>());
      a.numel = n;
      a.lanes = reinterpret_cast<Lane*>(p);
      p += Round(sizeof(Lane) * size_);
      for (uint32_t k = 0; k < size_; ++k) {
        a.grads.push_back(reinterpret_cast<float*>(p));
        p += Round(n * 4);
      }
      a.gather = reinterpret_cast<float*>(p);
      p += Round(n * 4);
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

  void Contribute(uint32_t t, uint64_t seq, NodeOpKind kind, const float* grad) override {
    Area& a = At(t);
    std::memcpy(a.grads[rank_], grad, a.numel * 4);
    Lane& l = a.lanes[rank_];
    l.kind.store(static_cast<uint64_t>(kind), std::memory_order_relaxed);
    l.arrived.store(seq, std::memory_order_release);
    Ring();
  }

  Result<const float*> Reduce(uint32_t t, uint64_t seq,
                              std::span<const std::pair<uint64_t, uint64_t>> mine) override {
    Area& a = At(t);
    for (uint32_t k = 0; k < size_; ++k)
      if (a.lanes[k].arrived.load(std::memory_order_acquire) < seq) return nullptr;
    const uint64_t kind = a.lanes[rank_].kind.load(std::memory_order_relaxed);
    for (uint32_t k = 0; k < size_; ++k)
      if (a.lanes[k].kind.load(std::memory_order_relaxed) != kind)
        return Status::InvalidArgument(fmt::format(
            "the workers of node {} issued different operations as operation {} of a tensor: "
            "local rank {} a {}, local rank {} a {} (every worker of a node pushes, or "
            "push_pulls, each tensor in the same order)",
            node_, seq, rank_, kind == 1 ? "push" : "push_pull", k,
            a.lanes[k].kind.load() == 1 ? "push" : "push_pull"));
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

  void Finish(uint32_t t, uint64_t seq, float* out) override {
    Area& a = At(t);
    if (out) std::memcpy(out, a.gather, a.numel * 4);
    a.lanes[rank_].finished.store(seq, std::memory_order_release);
    Ring();
  }

  std::vector<uint32_t> Missing(uint32_t t, uint64_t seq, NodePhase phase) override {
    const Area& a = At(t);
    std::vector<uint32_t> out;
    for (uint32_t k = 0; k < size_; ++k) {
      const Lane& l = a.lanes[k];
      const uint64_t at = phase == NodePhase::kFree          ? l.finished.load() + 1
                          : phase == NodePhase::kContributed ? l.arrived.load()
                                                             : l.done.load();
      if (at < seq) out.push_back(k);
    }
    return out;
  }

  uint32_t Bell() const override { return bell_.header()->bell.load(std::memory_order_acquire); }

  void Ring() override {
    auto* b = &bell_.header()->bell;
    b->fetch_add(1, std::memory_order_acq_rel);
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(b), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
  }

  void WaitBell(uint32_t seen, std::chrono::microseconds timeout) override {
    auto* b = &bell_.header()->bell;
    if (b->load(std::memory_order_acquire) != seen) return;
    timespec ts{};
    ts.tv_sec = static_cast<time_t>(timeout.count() / 1000000);
    ts.tv_nsec = static_cast<long>(timeout.count() % 1000000 * 1000);
    // A shared (not private) futex: the node's other processes wake it.
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(b), FUTEX_WAIT, seen, &ts, nullptr, 0);
  }

 private:
  std::string Name(const std::string& what) const {
    return fmt::format("/shardps-{:016x}-n{}-{}", job_, node_, what);
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

  const uint64_t job_;
  const uint32_t node_, rank_, size_;
  Segment bell_;
  std::vector<std::unique_ptr<Segment>> segments_;  // the declaring thread's
  std::mutex mu_;
  std::vector<std::unique_ptr<Area>> areas_;  // by tensor id; guarded by mu_
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

}  // namespace shardps::worker
