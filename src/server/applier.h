// The server's apply threads. Pushes of a chunk always run on the same thread (the chunk's
// state needs no lock), and an update of a large chunk is split into ranges that the idle apply
// threads run alongside the owning one (ParallelFor): every rule the server applies is
// element-wise, so a 4 MiB update on N idle threads takes about 1/N of the time.
//
// A thread that ran out of work polls for `busy_poll` (yielding the core) before it sleeps, as
// the transport's progress threads do: a wake-up costs tens of microseconds.
#pragma once

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <deque>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace shardps::server {

class Applier {
 public:
  using RangeFn = std::function<void(size_t lo, size_t hi)>;

  ~Applier() { Stop(); }

  void Start(uint32_t threads, std::chrono::microseconds busy_poll);
  // Stops the threads: a running task ends, tasks still queued are dropped.
  void Stop();
  // Queues fn on the thread of `key` (key % threads).
  void Post(uint64_t key, std::function<void()> fn);
  // Runs body over [0, n) in ranges of `grain` elements, on the calling thread and on the apply
  // threads that are idle meanwhile; returns when every range has run. Ranges never overlap, so
  // body may write its range without a lock. Any thread may call it (an apply thread inside a
  // task, typically); with fewer than two apply threads, or n < 2 * grain, it is just body(0, n).
  void ParallelFor(size_t n, size_t grain, const RangeFn& body);

  // Ranges run by threads other than the caller of ParallelFor, since Start.
  uint64_t ranges_helped() const { return ranges_helped_.load(); }
  // Tasks queued and not started, over every thread (between Start and Stop).
  size_t queued() const {
    size_t n = 0;
    for (const auto& q : queues_) n += q.pending.load(std::memory_order_relaxed);
    return n;
  }

 private:
  struct Queue {
    std::mutex mu;
    std::condition_variable cv;
    std::deque<std::function<void()>> tasks;
    std::atomic<size_t> pending{0};  // tasks.size(), for polling without the lock
    bool stop = false;
  };
  // One ParallelFor in progress; lives on its caller's stack.
  struct Job {
    const RangeFn* body = nullptr;
    size_t n = 0, grain = 0;
    std::atomic<size_t> next{0};       // first element not yet handed out
    std::atomic<size_t> done{0};       // elements whose range has run
    std::atomic<uint32_t> helpers{0};  // threads inside RunRanges for this job
  };

  void Run(Queue& q);
  // Joins an open job, if any, and runs its ranges until none is left.
  void Help();
  // Runs ranges of j until none is left; returns how many it ran.
  static uint64_t RunRanges(Job& j);
  // Closes j to new helpers.
  void Close(Job* j);

  std::chrono::microseconds busy_poll_{0};
  std::deque<Queue> queues_;
  std::vector<std::thread> threads_;

  std::mutex jobs_mu_;
  std::vector<Job*> jobs_;            // open jobs, guarded by jobs_mu_
  std::atomic<size_t> open_jobs_{0};  // jobs_.size(), for polling without the lock
  std::atomic<uint64_t> ranges_helped_{0};
};

}  // namespace shardps::server
