#include "gpu/device.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <mutex>
#include <string_view>
#include <thread>
#include <unordered_map>
#include <vector>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "gpu/cuda.h"

#if SHARDPS_HAVE_KERNELS
// The fatbin of kernels.cu, carried in the library (kernels_image.cc).
extern "C" const unsigned char shardps_kernels_fatbin[];
#endif

namespace shardps::gpu {
namespace {

Status BadDevice(const std::string& spec) {
  return Status::InvalidArgument(fmt::format(
      "device '{}': expected cpu, cuda, cuda:N (a GPU's index), twin or twin:SIZE", spec));
}

// One thread that runs queued tasks in order.
class Lane {
 public:
  Lane() : thread_([this] { Loop(); }) {}
  ~Lane() {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_one();
    thread_.join();
  }
  void Post(std::function<void()> fn) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      tasks_.push_back(std::move(fn));
    }
    cv_.notify_one();
  }

 private:
  void Loop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [this] { return stop_ || !tasks_.empty(); });
      if (tasks_.empty()) return;  // stopping, and everything queued ran
      auto fn = std::move(tasks_.front());
      tasks_.pop_front();
      lock.unlock();
      fn();
      lock.lock();
    }
  }

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::function<void()>> tasks_;  // guarded by mu_
  bool stop_ = false;                        // guarded by mu_
  std::thread thread_;
};

class TwinDevice final : public Device {
 public:
  TwinDevice(int streams, uint64_t capacity)
      : lanes_(static_cast<size_t>(streams < 1 ? 1 : streams)), capacity_(capacity) {
    for (auto& l : lanes_) l = std::make_unique<gpu::Lane>();
  }
  ~TwinDevice() override { lanes_.clear(); }  // runs what is queued, then joins

  std::string name() const override { return "twin"; }
  bool is_gpu() const override { return false; }
  int streams() const override { return static_cast<int>(lanes_.size()); }
  Result<uint64_t> FreeBytes() const override {
    std::lock_guard<std::mutex> lock(mu_);
    return capacity_ ? capacity_ - used_ : UINT64_MAX;
  }

  Result<void*> Alloc(size_t bytes) override {
    const size_t rounded = (bytes + 255) / 256 * 256;
    std::lock_guard<std::mutex> lock(mu_);
    if (capacity_ && rounded > capacity_ - used_)
      return Status::ResourceExhausted(
          fmt::format("twin: {} bytes asked for, {} free", bytes, capacity_ - used_));
    void* p = std::aligned_alloc(256, rounded);
    if (!p) return Status::ResourceExhausted(fmt::format("twin: no memory for {} bytes", bytes));
    used_ += rounded;
    sizes_[p] = rounded;
    return p;
  }
  void Free(void* p) override {
    if (!p) return;
    std::lock_guard<std::mutex> lock(mu_);
    auto it = sizes_.find(p);
    if (it != sizes_.end()) {
      used_ -= it->second;
      sizes_.erase(it);
    }
    std::free(p);
  }
  Status Pin(void*, size_t) override { return Status::OK(); }
  void Unpin(void*) override {}

  Status Copy(void* dst, const void* src, size_t bytes, int s) override {
    Lane(s).Post([dst, src, bytes] { std::memcpy(dst, src, bytes); });
    return Status::OK();
  }
  Status Update(int optimizer, int codec, const UpdateArgs& a, int s) override {
    Lane(s).Post([optimizer, codec, a] { UpdateOnHost(optimizer, codec, a); });
    return Status::OK();
  }
  Status Fold(int codec, const FoldArgs& a, int s) override {
    Lane(s).Post([codec, a] { FoldOnHost(codec, a); });
    return Status::OK();
  }
  void Then(int s, std::function<void(Status)> fn) override {
    Lane(s).Post([fn = std::move(fn)] { fn(Status::OK()); });
  }
  Status Wait(int s, std::chrono::milliseconds timeout) override {
    auto done = std::make_shared<Flag>();
    Lane(s).Post([done] { done->Set(); });
    if (done->WaitFor(timeout)) return Status::OK();
    return Status::Timeout(
        fmt::format("twin stream {} did not finish within {} ms", s, timeout.count()));
  }

 private:
  struct Flag {
    std::mutex mu;
    std::condition_variable cv;
    bool set = false;
    void Set() {
      std::lock_guard<std::mutex> lock(mu);
      set = true;
      cv.notify_all();
    }
    bool WaitFor(std::chrono::milliseconds t) {
      std::unique_lock<std::mutex> lock(mu);
      return cv.wait_for(lock, t, [this] { return set; });
    }
  };
  gpu::Lane& Lane(int s) { return *lanes_[static_cast<size_t>(s) % lanes_.size()]; }

  std::vector<std::unique_ptr<gpu::Lane>> lanes_;
  const uint64_t capacity_;
  mutable std::mutex mu_;
  uint64_t used_ = 0;                        // guarded by mu_
  std::unordered_map<void*, size_t> sizes_;  // guarded by mu_
};

#if SHARDPS_HAVE_KERNELS

constexpr unsigned kThreads = 256;  // the kernels' __launch_bounds__

class CudaDevice final : public Device {
 public:
  ~CudaDevice() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      stop_ = true;
    }
    cv_.notify_one();
    if (poller_.joinable()) poller_.join();
    for (Stream s : streams_) cuda_->DestroyStream(s);
    for (Event e : spare_events_) cuda_->DestroyEvent(e);
  }

  Status Init(int index, int streams) {
    SHARDPS_ASSIGN_OR_RETURN(cuda_, Cuda::Load());
    if (index < 0 || index >= cuda_->device_count())
      return Status::NotFound(fmt::format("GPU {} does not exist: {} GPU{} visible", index,
                                          cuda_->device_count(),
                                          cuda_->device_count() == 1 ? " is" : "s are"));
    index_ = index;
    SHARDPS_RETURN_IF_ERROR(cuda_->SetDevice(index_));
    for (int i = 0; i < (streams < 1 ? 1 : streams); ++i) {
      SHARDPS_ASSIGN_OR_RETURN(Stream s, cuda_->CreateStream());
      streams_.push_back(s);
    }
    SHARDPS_ASSIGN_OR_RETURN(void* lib, cuda_->LoadKernels(shardps_kernels_fatbin));
    for (int o = 0; o < 4; ++o) {
      for (int c = 0; c < 6; ++c) {
        SHARDPS_ASSIGN_OR_RETURN(
            update_[o][c], cuda_->Kernel(lib, fmt::format("shardps_update_{}_{}", o, c).c_str()));
      }
    }
    for (int c = 0; c < 6; ++c) {
      SHARDPS_ASSIGN_OR_RETURN(fold_[c],
                               cuda_->Kernel(lib, fmt::format("shardps_fold_{}", c).c_str()));
    }
    max_grid_ = static_cast<unsigned>(std::max(1, cuda_->Multiprocessors(index_))) * 8;
    name_ = fmt::format("cuda:{} ({})", index_, cuda_->Describe(index_));
    poller_ = std::thread([this] { Poll(); });
    return Status::OK();
  }

  std::string name() const override { return name_; }
  bool is_gpu() const override { return true; }
  int streams() const override { return static_cast<int>(streams_.size()); }
  Result<uint64_t> FreeBytes() const override {
    SHARDPS_RETURN_IF_ERROR(cuda_->SetDevice(index_));
    uint64_t f = 0, t = 0;
    SHARDPS_RETURN_IF_ERROR(cuda_->MemoryInfo(&f, &t));
    return f;
  }

  Result<void*> Alloc(size_t bytes) override {
    SHARDPS_RETURN_IF_ERROR(cuda_->SetDevice(index_));
    return cuda_->DeviceAlloc(bytes);
  }
  void Free(void* p) override {
    if (cuda_->SetDevice(index_).ok()) cuda_->DeviceFree(p);
  }
  Status Pin(void* p, size_t bytes) override { return cuda_->Pin(p, bytes); }
  void Unpin(void* p) override { cuda_->Unpin(p); }

  Status Copy(void* dst, const void* src, size_t bytes, int s) override {
    SHARDPS_RETURN_IF_ERROR(cuda_->SetDevice(index_));
    return cuda_->CopyAsync(dst, src, bytes, StreamOf(s));
  }
  Status Update(int optimizer, int codec, const UpdateArgs& a, int s) override {
    if (optimizer < 0 || optimizer > 3 || codec < 0 || codec > 5)
      return Status::InvalidArgument(
          fmt::format("no kernel for optimizer {} codec {}", optimizer, codec));
    UpdateArgs copy = a;
    return Launch(update_[optimizer][codec], a.numel, &copy, s);
  }
  Status Fold(int codec, const FoldArgs& a, int s) override {
    if (codec < 0 || codec > 5)
      return Status::InvalidArgument(fmt::format("no fold kernel for codec {}", codec));
    FoldArgs copy = a;
    return Launch(fold_[codec], a.numel, &copy, s);
  }
  void Then(int s, std::function<void(Status)> fn) override {
    auto e = RecordOn(s);
    if (!e.ok()) return fn(e.status());
    {
      std::lock_guard<std::mutex> lock(mu_);
      pending_.push_back({*e, s, ++issued_[s], std::move(fn)});
    }
    cv_.notify_one();
  }
  Status Wait(int s, std::chrono::milliseconds timeout) override {
    uint64_t ticket = 0;  // the last callback of Then on `s` queued before this wait
    {
      std::lock_guard<std::mutex> lock(mu_);
      ticket = issued_[s];
    }
    SHARDPS_ASSIGN_OR_RETURN(Event e, RecordOn(s));
    const auto deadline = std::chrono::steady_clock::now() + timeout;
    for (;;) {
      // Complete once the stream's work is, and the callbacks of Then queued before have run
      // (what they finish may be destroyed after Wait).
      Result<bool> done = cuda_->Done(e);
      if (!done.ok() || (*done && CallbacksRan(s, ticket))) {
        GiveEvent(e);
        return done.status();
      }
      if (std::chrono::steady_clock::now() > deadline) {
        GiveEvent(e);
        return Status::Timeout(
            fmt::format("{} stream {} did not finish within {} ms", name_, s, timeout.count()));
      }
      std::this_thread::sleep_for(std::chrono::microseconds(5));
    }
  }

 private:
  struct Pending {
    Event event;
    int stream;
    uint64_t ticket;  // per stream, in the order of Then
    std::function<void(Status)> fn;
  };

  // Whether the callbacks of Then on `stream` up to `ticket` have run (callbacks of one stream
  // run in their order: its events complete in order, and the poller takes them in order).
  bool CallbacksRan(int stream, uint64_t ticket) {
    std::lock_guard<std::mutex> lock(mu_);
    return ran_[stream] >= ticket;
  }

  Stream StreamOf(int s) const { return streams_[static_cast<size_t>(s) % streams_.size()]; }

  Status Launch(void* kernel, uint64_t numel, void* arg, int s) {
    SHARDPS_RETURN_IF_ERROR(cuda_->SetDevice(index_));
    const uint64_t blocks = (numel + kThreads - 1) / kThreads;
    const unsigned grid =
        static_cast<unsigned>(std::max<uint64_t>(1, std::min<uint64_t>(blocks, max_grid_)));
    return cuda_->Launch(kernel, grid, kThreads, arg, StreamOf(s));
  }

  Result<Event> RecordOn(int s) {
    SHARDPS_RETURN_IF_ERROR(cuda_->SetDevice(index_));
    Event e = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!spare_events_.empty()) {
        e = spare_events_.back();
        spare_events_.pop_back();
      }
    }
    if (!e) {
      SHARDPS_ASSIGN_OR_RETURN(e, cuda_->CreateEvent());
    }
    if (Status st = cuda_->Record(e, StreamOf(s)); !st.ok()) {
      GiveEvent(e);
      return st;
    }
    return e;
  }
  void GiveEvent(Event e) {
    std::lock_guard<std::mutex> lock(mu_);
    spare_events_.push_back(e);
  }

  // Calls the callbacks of Then as their events complete (queries only: a callback never waits
  // for a stream, and a failed stream still answers).
  void Poll() {
    // Event queries run in this GPU's context (not in a new one on GPU 0).
    if (Status st = cuda_->SetDevice(index_); !st.ok())
      spdlog::warn("{}: the completion thread cannot select the GPU: {}", name_, st.ToString());
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [this] { return stop_ || !pending_.empty(); });
      if (stop_ && pending_.empty()) return;
      struct Ready {
        std::function<void(Status)> fn;
        Status st;
        int stream;
        uint64_t ticket;
      };
      std::vector<Ready> ready;
      for (auto it = pending_.begin(); it != pending_.end();) {
        Result<bool> done = cuda_->Done(it->event);
        if (done.ok() && !*done && !stop_) {
          ++it;
          continue;
        }
        Status st = done.ok() ? (*done ? Status::OK()
                                       : Status::Aborted(name_ + " closed before the work ran"))
                              : done.status();
        ready.push_back({std::move(it->fn), std::move(st), it->stream, it->ticket});
        spare_events_.push_back(it->event);
        it = pending_.erase(it);
      }
      lock.unlock();
      for (auto& r : ready) {
        r.fn(std::move(r.st));
        std::lock_guard<std::mutex> l(mu_);
        ran_[r.stream] = std::max(ran_[r.stream], r.ticket);
      }
      if (ready.empty()) std::this_thread::sleep_for(std::chrono::microseconds(5));
      lock.lock();
    }
  }

  std::shared_ptr<Cuda> cuda_;
  int index_ = 0;
  std::string name_;
  std::vector<Stream> streams_;
  void* update_[4][6] = {};
  void* fold_[6] = {};
  unsigned max_grid_ = 1;

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Pending> pending_;      // guarded by mu_
  std::vector<Event> spare_events_;  // guarded by mu_
  bool stop_ = false;                // guarded by mu_
  std::map<int, uint64_t> issued_;   // guarded by mu_: per stream, the last ticket of Then
  std::map<int, uint64_t> ran_;  // guarded by mu_: per stream, the last ticket whose callback ran
  std::thread poller_;
};

#endif  // SHARDPS_HAVE_KERNELS

}  // namespace

Result<std::shared_ptr<Device>> OpenCudaDevice(int index, int streams) {
#if SHARDPS_HAVE_KERNELS
  auto d = std::make_shared<CudaDevice>();
  SHARDPS_RETURN_IF_ERROR(d->Init(index, streams));
  return std::shared_ptr<Device>(std::move(d));
#else
  (void)index;
  (void)streams;
  return Status::NotFound(
      "this build of ShardPS has no CUDA kernels (built without nvcc: SHARDPS_CUDA)");
#endif
}

std::shared_ptr<Device> MakeTwinDevice(int streams, uint64_t capacity) {
  return std::make_shared<TwinDevice>(streams, capacity);
}

Status ParseDevice(const std::string& spec, DeviceSpec* out) {
  *out = DeviceSpec{};
  // Digits, then an optional suffix from `suffixes` (with its multiplier).
  auto number = [](std::string_view t, uint64_t* v) {
    uint64_t mult = 1;
    for (auto [suffix, m] :
         {std::pair{"KiB", 1ull << 10}, {"MiB", 1ull << 20}, {"GiB", 1ull << 30}}) {
      std::string_view s(suffix);
      if (t.size() > s.size() && t.substr(t.size() - s.size()) == s) {
        t.remove_suffix(s.size());
        mult = m;
        break;
      }
    }
    if (t.empty() || t.size() > 9) return false;
    uint64_t n = 0;
    for (char c : t) {
      if (c < '0' || c > '9') return false;
      n = n * 10 + static_cast<uint64_t>(c - '0');
    }
    *v = n * mult;
    return true;
  };
  if (spec == "cpu") return Status::OK();
  if (spec == "twin") {
    out->twin = true;
    return Status::OK();
  }
  if (spec.rfind("twin:", 0) == 0) {
    out->twin = true;
    if (number(std::string_view(spec).substr(5), &out->twin_bytes) && out->twin_bytes > 0)
      return Status::OK();
    return BadDevice(spec);
  }
  if (spec == "cuda") {
    out->gpu = 0;
    return Status::OK();
  }
  uint64_t n = 0;
  if (spec.rfind("cuda:", 0) == 0 && spec.size() <= 9 &&
      spec.find_first_not_of("0123456789", 5) == std::string::npos &&
      number(std::string_view(spec).substr(5), &n)) {
    out->gpu = static_cast<int>(n);
    return Status::OK();
  }
  return BadDevice(spec);
}

}  // namespace shardps::gpu
