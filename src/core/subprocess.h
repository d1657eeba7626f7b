// Runs a command with a hard deadline and captures its output (stdout and stderr together).
// Used by `shardps bench` (ucx_perftest) and by the tests that run real processes.
#pragma once

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <string>
#include <vector>

namespace shardps {

struct CommandResult {
  int exit_code = -1;  // 128+signal when killed; -1 when the deadline passed
  bool timed_out = false;
  std::string output;
  double seconds = 0;
};

// `on_start(pid)` runs right after the fork (e.g. to signal the process later).
template <typename OnStart = void (*)(pid_t)>
CommandResult RunCommand(
    const std::vector<std::string>& argv, std::chrono::seconds deadline,
    const std::vector<std::string>& env = {}, OnStart on_start = [](pid_t) {}) {
  CommandResult r;
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return r;
  auto t0 = std::chrono::steady_clock::now();
  pid_t pid = fork();
  if (pid == 0) {
    setpgid(0, 0);  // its own group: the deadline kills everything it started
    dup2(fds[1], 1);
    dup2(fds[1], 2);
    for (const auto& kv : env) putenv(const_cast<char*>(kv.c_str()));
    std::vector<char*> args;
    for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
    args.push_back(nullptr);
    execvp(args[0], args.data());
    _exit(127);
  }
  close(fds[1]);
  on_start(pid);
  char buf[4096];
  bool open = true;
  while (open) {
    auto left = deadline - (std::chrono::steady_clock::now() - t0);
    int ms = static_cast<int>(std::chrono::duration_cast<std::chrono::milliseconds>(left).count());
    if (ms <= 0) {
      r.timed_out = true;
      kill(-pid, SIGKILL);
      break;
    }
    pollfd p{fds[0], POLLIN, 0};
    if (poll(&p, 1, ms) <= 0) continue;
    ssize_t n = read(fds[0], buf, sizeof(buf));
    if (n <= 0)
      open = false;
    else
      r.output.append(buf, static_cast<size_t>(n));
  }
  close(fds[0]);
  int st = 0;
  waitpid(pid, &st, 0);
  if (!r.timed_out) r.exit_code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace shardps
