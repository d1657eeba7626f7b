// What every backend's loop thread needs, written once (tcp/loop, ucx/loop): a queue of tasks
// that other threads hand over and the loop drains, which stops accepting at shutdown (tasks
// queued before still run, so every callback fires exactly once), the loop's thread identity,
// and run-on-the-loop-and-wait.
#pragma once

#include <atomic>
#include <deque>
#include <functional>
#include <future>
#include <memory>
#include <mutex>
#include <thread>

namespace shardps::transport {

class TaskQueue {
 public:
  // Queues fn; false (fn dropped) once Close()d. *first tells whether the queue was empty, so
  // the caller knows a wake-up is needed (one per batch).
  bool Push(std::function<void()> fn, bool* first = nullptr) {
    std::lock_guard<std::mutex> lock(mu_);
    if (!accepting_) return false;
    if (first) *first = tasks_.empty();
    tasks_.push_back(std::move(fn));
    return true;
  }
  // Runs what is queued, and what those tasks queue, until empty; `after_each` runs after each
  // task (ucx progresses its worker there). True if anything ran.
  bool Drain(const std::function<void()>& after_each = nullptr) {
    bool ran = false;
    for (;;) {
      std::deque<std::function<void()>> batch;
      {
        std::lock_guard<std::mutex> lock(mu_);
        batch.swap(tasks_);
      }
      if (batch.empty()) return ran;
      ran = true;
      for (auto& fn : batch) {
        fn();
        if (after_each) after_each();
      }
    }
  }
  // Stops accepting; false if it was closed already.
  bool Close() {
    std::lock_guard<std::mutex> lock(mu_);
    if (!accepting_) return false;
    accepting_ = false;
    return true;
  }
  bool empty() const {
    std::lock_guard<std::mutex> lock(mu_);
    return tasks_.empty();
  }

 private:
  mutable std::mutex mu_;
  std::deque<std::function<void()>> tasks_;  // guarded by mu_
  bool accepting_ = true;                    // guarded by mu_
};

// The identity of a loop's thread, set by the thread itself when it starts.
class LoopThread {
 public:
  void MarkCurrent() { id_ = std::this_thread::get_id(); }
  bool IsCurrent() const { return std::this_thread::get_id() == id_.load(); }

 private:
  std::atomic<std::thread::id> id_{};
};

// Runs fn on a loop (through `post`, which returns false once the loop stopped) and waits for
// its result; inline when already on that loop; `if_stopped` when the loop is gone.
template <typename T, typename Post>
T CallOnLoop(const LoopThread& loop, Post&& post, std::function<T()> fn, T if_stopped) {
  if (loop.IsCurrent()) return fn();
  auto pr = std::make_shared<std::promise<T>>();
  auto fut = pr->get_future();
  if (!post([pr, fn] { pr->set_value(fn()); })) return if_stopped;
  return fut.get();
}

// Fails every pending operation of a map (id -> op with a `done` callback) with `why`: the
// map is emptied first, so callbacks that start new operations do not see the old ones.
template <typename Map, typename S>
void FailPending(Map& pending, const S& why) {
  Map ops = std::move(pending);
  pending.clear();
  for (auto& [id, op] : ops) op.done(why);
}

}  // namespace shardps::transport
