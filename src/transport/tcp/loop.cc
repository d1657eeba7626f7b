#include "transport/tcp/loop.h"

#include <pthread.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>

namespace shardps::transport::tcp {

Loop::Loop() = default;

Loop::~Loop() { Stop(); }

Status Loop::Start(const std::string& name) {
  epfd_ = epoll_create1(EPOLL_CLOEXEC);
  if (epfd_ < 0) return Status::FromErrno("epoll_create1", errno);
  wakefd_ = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (wakefd_ < 0) return Status::FromErrno("eventfd", errno);
  epoll_event ev{};
  ev.events = EPOLLIN;
  ev.data.fd = wakefd_;
  if (epoll_ctl(epfd_, EPOLL_CTL_ADD, wakefd_, &ev) != 0)
    return Status::FromErrno("epoll_ctl", errno);
  thread_ = std::thread([this, name] {
    thread_id_.MarkCurrent();
    pthread_setname_np(pthread_self(), name.substr(0, 15).c_str());
    Run();
  });
  return Status::OK();
}

void Loop::Stop() {
  if (!tasks_.Close()) return;
  stopping_ = true;
  if (wakefd_ >= 0) {
    uint64_t one = 1;
    [[maybe_unused]] ssize_t n = write(wakefd_, &one, sizeof(one));
  }
  if (thread_.joinable()) thread_.join();
  handlers_.clear();
  if (wakefd_ >= 0) close(wakefd_);
  if (epfd_ >= 0) close(epfd_);
  wakefd_ = epfd_ = -1;
}

bool Loop::Defer(std::function<void()> fn) {
  bool first = false;
  if (!tasks_.Push(std::move(fn), &first)) return false;
  if (!first) return true;  // a wake-up is already pending
  uint64_t one = 1;
  [[maybe_unused]] ssize_t n = write(wakefd_, &one, sizeof(one));
  return true;
}

Status Loop::Add(int fd, uint32_t events, FdHandler handler) {
  epoll_event ev{};
  ev.events = events;
  ev.data.fd = fd;
  if (epoll_ctl(epfd_, EPOLL_CTL_ADD, fd, &ev) != 0)
    return Status::FromErrno("epoll_ctl add", errno);
  handlers_[fd] = std::make_shared<FdHandler>(std::move(handler));
  return Status::OK();
}

Status Loop::Modify(int fd, uint32_t events) {
  epoll_event ev{};
  ev.events = events;
  ev.data.fd = fd;
  if (epoll_ctl(epfd_, EPOLL_CTL_MOD, fd, &ev) != 0)
    return Status::FromErrno("epoll_ctl mod", errno);
  return Status::OK();
}

void Loop::Remove(int fd) {
  epoll_ctl(epfd_, EPOLL_CTL_DEL, fd, nullptr);
  handlers_.erase(fd);
}

void Loop::Run() {
  epoll_event events[64];
  while (!stopping_) {
    int n = epoll_wait(epfd_, events, 64, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      break;
    }
    for (int i = 0; i < n; ++i) {
      int fd = events[i].data.fd;
      if (fd == wakefd_) {
        uint64_t v;
        [[maybe_unused]] ssize_t r = read(wakefd_, &v, sizeof(v));
        continue;
      }
      auto it = handlers_.find(fd);
      if (it == handlers_.end()) continue;
      auto h = it->second;  // keep alive: the handler may Remove() itself
      (*h)(events[i].events);
    }
    tasks_.Drain();
  }
  // Final drain: tasks queued before Stop() still run (their callbacks fire exactly once).
  tasks_.Drain();
}

}  // namespace shardps::transport::tcp
