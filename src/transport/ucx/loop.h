// The progress loop of a ucx context: the UCP worker and the one thread that progresses it
// (the ucx counterpart of tcp/loop.h). Every UCP call of a context runs on this thread
// (UCS_THREAD_MODE_SINGLE); other threads hand work over with Post(). Its task queue is the
// transport's shared one (transport/task_queue.h).
#pragma once

#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <ucp/api/ucp.h>
#include <unistd.h>

#include <sched.h>

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include <spdlog/spdlog.h>

#include "core/codec.h"
#include "shardps/status.h"
#include "transport/context.h"
#include "transport/task_queue.h"

namespace shardps::transport::ucx {

// A UCS status as a Status (connection-level failures are Unavailable).
Status FromUcs(const std::string& what, ucs_status_t st);

// Creates a UCP context from the options' UCX_* settings (prefix optional).
Result<ucp_context_h> MakeUcpContext(const ContextOptions& options);

// How much longer than busy_poll the loop keeps polling after its last event while a
// HoldPolling() token lives: long enough for an apply of a 4 MiB chunk, and still bounded.
constexpr int kHeldPollFactor = 10;

// The UCP worker and the one thread that progresses it. Every UCP call of a context runs on
// this thread (UCS_THREAD_MODE_SINGLE); other threads hand work over with Post().
class Progress {
 public:
  Status Start(ucp_context_h ctx, const std::string& name, std::chrono::microseconds busy_poll) {
    busy_poll_ = busy_poll;
    ucp_worker_params_t wp{};
    wp.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE;
    wp.thread_mode = UCS_THREAD_MODE_SINGLE;
    ucs_status_t st = ucp_worker_create(ctx, &wp, &worker_);
    if (st != UCS_OK) return FromUcs("ucp_worker_create", st);
    ucp_address_t* addr = nullptr;
    size_t len = 0;
    st = ucp_worker_get_address(worker_, &addr, &len);
    if (st != UCS_OK) return FromUcs("ucp_worker_get_address", st);
    address_.assign(reinterpret_cast<uint8_t*>(addr), reinterpret_cast<uint8_t*>(addr) + len);
    ucp_worker_release_address(worker_, addr);
    int ufd = -1;
    if (ucp_worker_get_efd(worker_, &ufd) != UCS_OK) ufd = -1;
    wake_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    epfd_ = epoll_create1(EPOLL_CLOEXEC);
    epoll_event ev{};
    ev.events = EPOLLIN;
    ev.data.fd = wake_;
    epoll_ctl(epfd_, EPOLL_CTL_ADD, wake_, &ev);
    if (ufd >= 0) {
      ev.data.fd = ufd;
      epoll_ctl(epfd_, EPOLL_CTL_ADD, ufd, &ev);
    }
    name_ = name;
    thread_ = std::thread([this, name] {
      thread_id_.MarkCurrent();
      pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
      Run();
    });
    return Status::OK();
  }

  // Runs the queued tasks, then stops; the worker is destroyed by Destroy() afterwards.
  void Stop() {
    if (!tasks_.Close()) return;
    stop_ = true;
    Wake();
    if (thread_.joinable()) thread_.join();
  }
  void Destroy() {
    if (worker_) ucp_worker_destroy(worker_);
    worker_ = nullptr;
    if (wake_ >= 0) close(wake_);
    if (epfd_ >= 0) close(epfd_);
    wake_ = epfd_ = -1;
  }

  bool Post(std::function<void()> fn) {
    if (!tasks_.Push(std::move(fn))) return false;
    Wake();
    return true;
  }
  // From the progress thread: runs fn once the current progress call returned (no wake-up
  // needed: the loop drains its tasks before it sleeps). From elsewhere: Post.
  void Defer(std::function<void()> fn) {
    if (!InThread()) {
      Post(std::move(fn));
      return;
    }
    tasks_.Push(std::move(fn));
  }
  // Runs fn on the progress thread and waits for its result.
  template <typename T>
  T Call(std::function<T()> fn, T if_stopped) {
    return CallOnLoop<T>(
        thread_id_, [this](std::function<void()> f) { return Post(std::move(f)); }, std::move(fn),
        std::move(if_stopped));
  }
  // A token that keeps the loop polling while it lives (see Context::HoldPolling).
  std::shared_ptr<void> HoldPolling() {
    if (busy_poll_.count() == 0) return nullptr;
    struct Hold {
      explicit Hold(std::shared_ptr<std::atomic<int>> n) : holds(std::move(n)) {
        holds->fetch_add(1);
      }
      ~Hold() { holds->fetch_sub(1); }
      std::shared_ptr<std::atomic<int>> holds;
    };
    return std::make_shared<Hold>(holds_);
  }
  bool InThread() const { return thread_id_.IsCurrent(); }
  ucp_worker_h worker() const { return worker_; }
  const Bytes& address() const { return address_; }

 private:
  void Wake() {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = write(wake_, &one, sizeof(one));
  }
  // Runs the queued tasks, progressing the worker after each; true if there were any.
  bool Drain() {
    return tasks_.Drain([this] {
      while (ucp_worker_progress(worker_)) {
      }
    });
  }
  // The worker cannot be armed (UCX has events pending) although progress found nothing: a
  // send waits for a peer that does not read (stopped), or a peer died in the middle of a send
  // into this process's shared-memory queue (UCX's mm transport: the half-written entry is never
  // completed, and nothing behind it is ever received). True once that lasted 10 ms (since the
  // last progress), so that the loop stops spinning; said once per episode past 5 s.
  bool Stuck(std::chrono::steady_clock::time_point now) {
    if (stuck_since_ == std::chrono::steady_clock::time_point{}) {
      stuck_since_ = now;
      stuck_said_ = false;
      return false;
    }
    if (!stuck_said_ && now - stuck_since_ > std::chrono::seconds(5)) {
      stuck_said_ = true;
      spdlog::warn(
          "[{}] UCX has had events pending without progress for 5 s: a peer does not read what "
          "this process sends (stopped), or one died in the middle of a send into this "
          "process's shared-memory queue, which then receives nothing more (UCX's mm "
          "transport; where processes may be killed, run ucx over tcp or InfiniBand/RoCE)",
          name_);
    }
    return now - stuck_since_ > std::chrono::milliseconds(10);
  }

  // Waits up to `ms` for the worker's event fd or a Post(), and clears the latter.
  void Sleep(int ms) {
    epoll_event evs[4];
    int n = epoll_wait(epfd_, evs, 4, ms);
    for (int i = 0; i < n; ++i)
      if (evs[i].data.fd == wake_) {
        uint64_t v;
        [[maybe_unused]] ssize_t r = read(wake_, &v, sizeof(v));
      }
  }

  void Run() {
    auto last = std::chrono::steady_clock::now();
    while (!stop_) {
      bool any = false;
      while (ucp_worker_progress(worker_)) any = true;
      any = Drain() || any;
      auto now = std::chrono::steady_clock::now();
      if (any) {
        last = now;
        stuck_since_ = {};
      }
      // While someone holds the polling (an apply owes an acknowledgement), the window is
      // kHeldPollFactor times longer.
      auto window = holds_->load() > 0 ? busy_poll_ * kHeldPollFactor : busy_poll_;
      if (now - last < window) {
        // Busy-poll a while after the last event (a sleep and wake-up costs tens of
        // microseconds), yielding the core to anything else runnable.
        sched_yield();
        continue;
      }
      if (!tasks_.empty()) continue;
      if (ucp_worker_arm(worker_) == UCS_ERR_BUSY) {
        // Pending without progress: wait a millisecond at a time instead of spinning.
        if (Stuck(now)) Sleep(1);
        continue;
      }
      stuck_since_ = {};
      Sleep(20);
    }
    Drain();  // tasks queued before Stop() still run: their callbacks fire exactly once
    while (ucp_worker_progress(worker_)) {
    }
  }

  ucp_worker_h worker_ = nullptr;
  Bytes address_;
  std::string name_;
  // Stuck(): since when UCX was busy without progress, and whether that was said (loop thread).
  std::chrono::steady_clock::time_point stuck_since_{};
  bool stuck_said_ = false;
  std::chrono::microseconds busy_poll_{0};
  // Live HoldPolling() tokens; shared with them, so a token may outlive this object.
  std::shared_ptr<std::atomic<int>> holds_ = std::make_shared<std::atomic<int>>(0);
  std::thread thread_;
  LoopThread thread_id_;
  std::atomic<bool> stop_{false};
  int wake_ = -1, epfd_ = -1;
  TaskQueue tasks_;
};

}  // namespace shardps::transport::ucx
