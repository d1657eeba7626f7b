// The single epoll loop thread of a tcp context. Everything that touches a socket runs here,
// so connection state needs no locks; other threads hand work over with Defer().
#pragma once

#include <sys/epoll.h>

#include <atomic>
#include <functional>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include "shardps/status.h"
#include "transport/task_queue.h"

namespace shardps::transport::tcp {

class Loop {
 public:
  using FdHandler = std::function<void(uint32_t events)>;

  Loop();
  ~Loop();  // Stop() and join
  Status Start(const std::string& name);
  // Runs the queued tasks one last time, then ends the thread. Idempotent.
  void Stop();

  // Queues `fn` to run on the loop thread (never inline). Returns false after Stop().
  bool Defer(std::function<void()> fn);
  bool InLoop() const { return thread_id_.IsCurrent(); }

  // Loop thread only.
  Status Add(int fd, uint32_t events, FdHandler handler);
  Status Modify(int fd, uint32_t events);
  void Remove(int fd);

 private:
  void Run();
  int epfd_ = -1;
  int wakefd_ = -1;
  std::thread thread_;
  LoopThread thread_id_;
  std::atomic<bool> stopping_{false};
  TaskQueue tasks_;
  std::unordered_map<int, std::shared_ptr<FdHandler>> handlers_;  // loop thread only
};

}  // namespace shardps::transport::tcp
