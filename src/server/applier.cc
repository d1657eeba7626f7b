#include "server/applier.h"

#include <sched.h>

#include <algorithm>

namespace shardps::server {

void Applier::Start(uint32_t threads, std::chrono::microseconds busy_poll) {
  busy_poll_ = busy_poll;
  queues_.resize(threads);
  for (uint32_t i = 0; i < threads; ++i) threads_.emplace_back([this, i] { Run(queues_[i]); });
}

void Applier::Stop() {
  for (auto& q : queues_) {
    std::lock_guard<std::mutex> lock(q.mu);
    q.stop = true;
    q.cv.notify_all();
  }
  for (auto& t : threads_) t.join();
  threads_.clear();
}

void Applier::Post(uint64_t key, std::function<void()> fn) {
  Queue& q = queues_[key % queues_.size()];
  std::lock_guard<std::mutex> lock(q.mu);
  q.tasks.push_back(std::move(fn));
  q.pending.store(q.tasks.size(), std::memory_order_release);
  q.cv.notify_one();
}

void Applier::Run(Queue& q) {
  for (;;) {
    auto idle_since = std::chrono::steady_clock::now();
    while (q.pending.load(std::memory_order_acquire) == 0 && open_jobs_.load() == 0 &&
           std::chrono::steady_clock::now() - idle_since < busy_poll_)
      sched_yield();
    std::function<void()> fn;
    {
      std::unique_lock<std::mutex> lock(q.mu);
      q.cv.wait(lock, [&] { return q.stop || !q.tasks.empty() || open_jobs_.load() > 0; });
      if (q.stop) return;
      if (!q.tasks.empty()) {
        fn = std::move(q.tasks.front());
        q.tasks.pop_front();
        q.pending.store(q.tasks.size(), std::memory_order_release);
      }
    }
    // Helping first: a job in progress is an update someone is waiting for.
    Help();
    if (fn) fn();
  }
}

uint64_t Applier::RunRanges(Job& j) {
  uint64_t ran = 0;
  for (;;) {
    size_t lo = j.next.fetch_add(j.grain);
    if (lo >= j.n) return ran;
    size_t hi = std::min(j.n, lo + j.grain);
    (*j.body)(lo, hi);
    j.done.fetch_add(hi - lo);
    ++ran;
  }
}

void Applier::Close(Job* j) {
  std::lock_guard<std::mutex> lock(jobs_mu_);
  auto it = std::find(jobs_.begin(), jobs_.end(), j);
  if (it == jobs_.end()) return;
  jobs_.erase(it);
  open_jobs_.store(jobs_.size());
}

void Applier::Help() {
  while (open_jobs_.load() > 0) {
    Job* j = nullptr;
    {
      std::lock_guard<std::mutex> lock(jobs_mu_);
      if (jobs_.empty()) return;
      j = jobs_.front();
      // Joined under the lock: the owner closes the job under it, then waits for its helpers.
      j->helpers.fetch_add(1);
    }
    uint64_t ran = RunRanges(*j);
    ranges_helped_.fetch_add(ran);
    // Every range was handed out: close it so that no one else spins on it.
    Close(j);
    j->helpers.fetch_sub(1);  // the last access to j
  }
}

void Applier::ParallelFor(size_t n, size_t grain, const RangeFn& body) {
  grain = std::max<size_t>(grain, 1);
  if (queues_.size() < 2 || n < 2 * grain) return body(0, n);
  Job j;
  j.body = &body;
  j.n = n;
  j.grain = grain;
  {
    std::lock_guard<std::mutex> lock(jobs_mu_);
    jobs_.push_back(&j);
    open_jobs_.store(jobs_.size());
  }
  // Sleeping threads wake for it (polling ones see open_jobs_ at once).
  for (auto& q : queues_) {
    std::lock_guard<std::mutex> lock(q.mu);
    q.cv.notify_all();
  }
  RunRanges(j);
  Close(&j);
  // The ranges still running elsewhere are short (one grain each): wait polling.
  while (j.done.load() < n || j.helpers.load() > 0) sched_yield();
}

}  // namespace shardps::server
