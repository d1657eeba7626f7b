#include "launch.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/signalfd.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <string_view>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "metrics/timeline.h"
#include "transport/context.h"

namespace shardps::tools {
namespace {

using Clock = std::chrono::steady_clock;

struct Child {
  std::string name;  // "server 0", "worker 2"
  bool is_worker = false;
  std::vector<std::string> env;  // a worker's own variables: it is started again with them
  bool restarted = false;        // started again (--restart-workers) after its first process died
  pid_t pid = -1;
  int out = -1;  // read end of its stdout+stderr
  std::string partial;
  bool exited = false;
  int status = 0;
};

std::string Describe(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with status {}", WEXITSTATUS(status));
  if (WIFSIGNALED(status))
    return fmt::format("was killed by signal {} ({})", WTERMSIG(status),
                       strsignal(WTERMSIG(status)));
  return "stopped";
}

// Forks and execs argv with extra environment; stdout and stderr go to a pipe.
Result<Child> Spawn(const std::string& name, bool is_worker, const std::vector<std::string>& argv,
                    const std::vector<std::string>& parent_env,
                    const std::vector<std::string>& extra_env) {
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) return Status::FromErrno("pipe", errno);
  std::vector<std::string> env_store = MergeEnvironment(parent_env, extra_env);
  std::vector<char*> envp, args;
  for (auto& s : env_store) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> argv_store = argv;
  for (auto& s : argv_store) args.push_back(s.data());
  args.push_back(nullptr);
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0) return Status::FromErrno("fork", errno);
  if (pid == 0) {
    // The child dies with the launcher, whatever kills it.
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent) _exit(127);
    sigset_t none;
    sigemptyset(&none);
    sigprocmask(SIG_SETMASK, &none, nullptr);  // children get default signal handling
    dup2(fds[1], 1);
    dup2(fds[1], 2);
    execvpe(args[0], args.data(), envp.data());
    dprintf(2, "cannot run %s: %s\n", args[0], strerror(errno));
    _exit(127);
  }
  close(fds[1]);
  Child c;
  c.name = name;
  c.is_worker = is_worker;
  c.pid = pid;
  c.out = fds[0];
  return c;
}

void Forward(Child& c, bool flush_partial) {
  char buf[65536];
  for (;;) {
    ssize_t n = read(c.out, buf, sizeof(buf));
    if (n <= 0) break;
    c.partial.append(buf, static_cast<size_t>(n));
    if (n < static_cast<ssize_t>(sizeof(buf))) break;
  }
  size_t start = 0;
  for (;;) {
    size_t nl = c.partial.find('\n', start);
    if (nl == std::string::npos) break;
    std::string line = c.partial.substr(start, nl - start);
    if (!line.empty() && line.back() == '\r') line.pop_back();
    std::fprintf(stdout, "[%s] %s\n", c.name.c_str(), line.c_str());
    start = nl + 1;
  }
  c.partial.erase(0, start);
  if (flush_partial && !c.partial.empty()) {
    std::fprintf(stdout, "[%s] %s\n", c.name.c_str(), c.partial.c_str());
    c.partial.clear();
  }
  std::fflush(stdout);
}

}  // namespace

Result<LaunchOptions> LaunchFor(const JobFlags& job, std::vector<std::string> program,
                                const Environment& parent) {
  LaunchOptions lo;
  SHARDPS_ASSIGN_OR_RETURN(lo.coordinator, job.ToCoordinator());
  lo.landing_buffers = job.landing_buffers;
  lo.apply_threads = job.apply_threads;
  lo.device = job.device;
  lo.restore = job.restore;
  lo.busy_poll_us = job.busy_poll_us;
  lo.restart_workers = job.restart_workers;
  lo.restart_servers = job.restart_servers;
  if (lo.restart_servers > 0 && (lo.coordinator.replicas == 0 || lo.coordinator.num_servers < 2))
    return Status::InvalidArgument(
        "--restart-servers needs --replicas 1 and --servers 2 or more (a server joins only a job "
        "that keeps backups; without them a server's death ends the job)");
  if (lo.restart_workers > 0 && !lo.coordinator.continue_on_worker_loss)
    return Status::InvalidArgument(
        "--restart-workers needs --on-worker-loss continue (otherwise a worker's death ends the "
        "job before it could rejoin)");
  SHARDPS_RETURN_IF_ERROR(
      job.InboundBytes(&lo.connection_inbound_bytes, &lo.process_inbound_bytes));
  lo.program = std::move(program);
  lo.timeline = job.timeline;
  lo.parent_env = parent.entries();
  lo.env.push_back(fmt::format("{}={}", tunables::kAggregate.env, job.aggregate));
  auto fuse = ParseBytes(job.fuse_bytes);
  if (!fuse.ok()) return fuse.status().WithContext("--fuse-bytes");
  lo.env.push_back(fmt::format("{}={}", tunables::kFuseBytes.env, *fuse));
  lo.env.push_back(fmt::format("{}={}", tunables::kFuseUs.env, job.fuse_us));
  if (job.workers_per_node < 1 || job.workers % job.workers_per_node != 0)
    return Status::InvalidArgument(
        fmt::format("--workers-per-node {} does not divide --workers {}: every node has the same "
                    "number of workers",
                    job.workers_per_node, job.workers));
  lo.workers_per_node = job.workers_per_node;
  lo.env.push_back(fmt::format("{}={}", tunables::kNodeReducer.env, job.node_reducer));
  return lo;
}

std::vector<std::string> ChildEnvironment(const LaunchOptions& opt,
                                          const std::string& coordinator) {
  using namespace tunables;
  const auto& co = opt.coordinator;
  std::vector<std::string> env = {
      fmt::format("{}={}", kCoordinator.env, coordinator),
      fmt::format("{}={}", kTransport.env, co.transport),
      fmt::format("{}={}", kServers.env, co.num_servers),
      fmt::format("{}={}", kWorkers.env, co.num_workers),
      fmt::format("{}={}", kMode.env, ModeString(co.mode, co.staleness)),
      fmt::format("{}={}", kBusyPollUs.env, opt.busy_poll_us),
      fmt::format("{}={}", kConnectionInbound.env, opt.connection_inbound_bytes),
      fmt::format("{}={}", kProcessInbound.env, opt.process_inbound_bytes),
  };
  // Files by absolute path, so that a child started in another directory reads the same.
  auto file = [&](const Tunable& t, const std::string& path) {
    if (path.empty()) return;
    std::error_code ec;
    auto abs = std::filesystem::absolute(path, ec);
    env.push_back(fmt::format("{}={}", t.env, ec ? path : abs.string()));
  };
  file(kSecretFile, co.secret_file);
  file(kTlsCert, co.tls_cert);
  file(kTlsKey, co.tls_key);
  file(kTlsCa, co.tls_ca);
  file(kRestore, opt.restore);  // workers learn it too (shardps train starts from it)
  for (const auto& e : opt.env) env.push_back(e);
  return env;
}

std::string MetricsListenFor(const std::string& listen, int64_t task) {
  std::string host;
  uint16_t port = 0;
  if (listen.empty() || task < 0 || !transport::ParseHostPort(listen, &host, &port).ok() ||
      port == 0)
    return listen;
  return fmt::format("{}:{}", host, port + 1 + task);
}

std::vector<std::string> MergeEnvironment(const std::vector<std::string>& parent,
                                          const std::vector<std::string>& extra) {
  auto name = [](const std::string& kv) { return std::string_view(kv).substr(0, kv.find('=')); };
  std::set<std::string_view> replaced;
  for (const auto& kv : extra) replaced.insert(name(kv));
  std::vector<std::string> out;
  for (const auto& kv : parent)
    if (!replaced.count(name(kv))) out.push_back(kv);
  out.insert(out.end(), extra.begin(), extra.end());
  return out;
}

// --timeline: the children's files merged into one (those that exist: a process that died
// wrote none), the parts removed.
void MergeTimelineParts(const LaunchOptions& opt) {
  std::vector<std::string> parts;
  for (uint32_t i = 0; i < opt.coordinator.num_servers; ++i)
    parts.push_back(fmt::format("{}.server{}.json", opt.timeline, i));
  for (uint32_t i = 1; i <= opt.restart_servers; ++i)
    parts.push_back(fmt::format("{}.server-new{}.json", opt.timeline, i));
  for (uint32_t i = 0; i < opt.coordinator.num_workers; ++i)
    parts.push_back(fmt::format("{}.worker{}.json", opt.timeline, i));
  std::vector<std::string> found;
  for (auto& p : parts)
    if (access(p.c_str(), R_OK) == 0) found.push_back(p);
  Status st = metrics::MergeTimelines(found, opt.timeline);
  if (!st.ok()) {
    std::fprintf(stderr, "[launch] timeline: %s\n", st.ToString().c_str());
    return;
  }
  for (auto& p : found) std::remove(p.c_str());
  std::fprintf(stderr,
               "[launch] timeline of %zu of %zu processes in %s (open it in ui.perfetto.dev)\n",
               found.size(), parts.size(), opt.timeline.c_str());
}

std::string SelfExe() {
  char buf[4096];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return "shardps";
  buf[n] = 0;
  return buf;
}

int RunLaunch(const LaunchOptions& opt) {
  if (opt.program.empty()) {
    std::fprintf(
        stderr,
        "shardps launch: no program given (usage: shardps launch [flags] -- PROGRAM ARGS...)\n");
    return 2;
  }
  // Signals arrive through a signalfd in the loop below, not through handlers.
  sigset_t mask, old_mask;
  sigemptyset(&mask);
  sigaddset(&mask, SIGINT);
  sigaddset(&mask, SIGTERM);
  sigaddset(&mask, SIGCHLD);
  sigaddset(&mask, SIGHUP);
  sigprocmask(SIG_BLOCK, &mask, &old_mask);
  int sfd = signalfd(-1, &mask, SFD_CLOEXEC | SFD_NONBLOCK);

  auto coord = Coordinator::Start(opt.coordinator);
  if (!coord.ok()) {
    std::fprintf(stderr, "shardps launch: %s\n", coord.status().ToString().c_str());
    sigprocmask(SIG_SETMASK, &old_mask, nullptr);
    close(sfd);
    return 2;
  }
  std::string addr = (*coord)->address();
  const auto& co = opt.coordinator;
  using namespace tunables;
  char host_buf[256] = {0};
  gethostname(host_buf, sizeof(host_buf) - 1);
  const std::string host = host_buf;
  const std::vector<std::string> common = ChildEnvironment(opt, addr);
  std::vector<Child> children;
  Status spawn_error;
  // Server `i` of the job's; or, i at num_servers and above, the (i - num_servers + 1)th that
  // replaces a dead one (--restart-servers): the coordinator gives it its rank when it joins.
  auto spawn_server = [&](uint32_t i) -> Result<Child> {
    const bool joins = i >= co.num_servers;
    auto env = common;
    env.push_back("SHARDPS_ROLE=server");
    if (!joins) env.push_back(fmt::format("{}={}", kRank.env, i));
    if (!co.metrics_listen.empty())
      env.push_back(fmt::format(
          "{}={}", kMetricsListen.env,
          MetricsListenFor(co.metrics_listen, joins ? i + co.num_workers : int64_t{i})));
    if (!opt.timeline.empty())
      env.push_back(fmt::format("{}={}.server{}{}.json", kTimeline.env, opt.timeline,
                                joins ? "-new" : "", joins ? i - co.num_servers + 1 : i));
    std::vector<std::string> argv = {SelfExe(),
                                     "server",
                                     "--coordinator",
                                     addr,
                                     "--rank",
                                     joins ? "-1" : std::to_string(i),
                                     "--transport",
                                     co.transport,
                                     "--landing-buffers",
                                     std::to_string(opt.landing_buffers),
                                     "--apply-threads",
                                     std::to_string(opt.apply_threads),
                                     "--device",
                                     opt.device};
    return Spawn(
        joins ? fmt::format("new server {}", i - co.num_servers + 1) : fmt::format("server {}", i),
        false, argv, opt.parent_env, env);
  };
  for (uint32_t i = 0; i < co.num_servers && spawn_error.ok(); ++i) {
    auto c = spawn_server(i);
    if (c.ok())
      children.push_back(std::move(c).value());
    else
      spawn_error = c.status();
  }
  for (uint32_t i = 0; i < co.num_workers && spawn_error.ok(); ++i) {
    auto env = common;
    env.push_back("SHARDPS_ROLE=worker");
    env.push_back(fmt::format("{}={}", kRank.env, i));
    if (!co.metrics_listen.empty())
      env.push_back(fmt::format("{}={}", kMetricsListen.env,
                                MetricsListenFor(co.metrics_listen, co.num_servers + i)));
    if (!opt.timeline.empty())
      env.push_back(fmt::format("{}={}.worker{}.json", kTimeline.env, opt.timeline, i));
    if (opt.workers_per_node > 1) {
      // This host plays several nodes: each run of workers_per_node workers is one.
      const uint32_t k = opt.workers_per_node;
      env.push_back(fmt::format("{}={}", kWorkersPerNode.env, k));
      env.push_back(fmt::format("{}={}", kLocalRank.env, i % k));
      env.push_back(fmt::format("{}={}/node{}", kNode.env, host, i / k));
    }
    auto c = Spawn(fmt::format("worker {}", i), true, opt.program, opt.parent_env, env);
    if (c.ok()) {
      c->env = env;
      children.push_back(std::move(c).value());
    } else {
      spawn_error = c.status();
    }
  }

  int exit_code = 0;
  std::string stop_reason;
  if (!spawn_error.ok()) {
    stop_reason = spawn_error.ToString();
    exit_code = 1;
  }
  Clock::time_point term_sent{};
  bool terminating = !spawn_error.ok();
  bool killed = false;
  auto terminate_all = [&](int sig) {
    for (auto& c : children)
      if (!c.exited) kill(c.pid, sig);
  };
  // The job is stopped: every child gets SIGTERM (SIGKILL after the grace), the launch exits
  // with `code`, saying `reason`.
  auto stop = [&](std::string reason, int code) {
    stop_reason = std::move(reason);
    exit_code = code;
    terminating = true;
    terminate_all(SIGTERM);
    term_sent = Clock::now();
  };
  if (terminating) {
    terminate_all(SIGTERM);
    term_sent = Clock::now();
  }
  Clock::time_point workers_done{};
  bool all_workers_done = false;
  uint32_t restarts_left = opt.restart_workers;
  uint32_t servers_started = co.num_servers;  // --restart-servers: new ones count on from here
  for (;;) {
    std::vector<pollfd> pfds;
    std::vector<Child*> owners;
    pfds.push_back({sfd, POLLIN, 0});
    owners.push_back(nullptr);
    for (auto& c : children)
      if (c.out >= 0) {
        pfds.push_back({c.out, POLLIN, 0});
        owners.push_back(&c);
      }
    poll(pfds.data(), pfds.size(), 100);
    for (size_t i = 1; i < pfds.size(); ++i) {
      if (pfds[i].revents & POLLIN) Forward(*owners[i], false);
      if ((pfds[i].revents & (POLLHUP | POLLERR)) && !(pfds[i].revents & POLLIN)) {
        Forward(*owners[i], true);
        close(owners[i]->out);
        owners[i]->out = -1;
      }
    }
    signalfd_siginfo si;
    while (read(sfd, &si, sizeof(si)) == sizeof(si)) {
      if (si.ssi_signo == SIGINT || si.ssi_signo == SIGTERM || si.ssi_signo == SIGHUP) {
        if (!terminating) {
          stop(fmt::format("received {}", strsignal(static_cast<int>(si.ssi_signo))),
               128 + static_cast<int>(si.ssi_signo));
        } else {
          terminate_all(SIGKILL);  // a second Ctrl-C: no more grace
          killed = true;
        }
      }
    }
    // Reap.
    std::vector<size_t> restart;  // workers started again once the loop is done
    uint32_t new_servers = 0;     // servers started in the place of dead ones, after the loop
    for (auto& c : children) {
      if (c.exited) continue;
      int st = 0;
      if (waitpid(c.pid, &st, WNOHANG) != c.pid) continue;
      c.exited = true;
      c.status = st;
      bool ok = WIFEXITED(st) && WEXITSTATUS(st) == 0;
      if (terminating) continue;
      // A server ending is only normal once the coordinator says the job is done.
      bool job_done = (*coord)->Wait(std::chrono::milliseconds(0)).ok();
      if (!c.is_worker && !job_done && opt.coordinator.replicas > 0 &&
          opt.coordinator.num_servers > 1) {
        // Replication: the coordinator replaces it with its chunks' backups, or fails the job
        // (seen below) when it cannot.
        const bool again = servers_started + new_servers < co.num_servers + opt.restart_servers;
        std::fprintf(stderr, "[launch] %s %s; the job goes on with its chunks' backups%s\n",
                     c.name.c_str(), Describe(st).c_str(),
                     again ? ", and a new server joins it in its place" : "");
        if (again) ++new_servers;
        continue;
      }
      if (c.is_worker && c.restarted && !ok && job_done) {
        // Started again as the others finished: the job had ended before it could rejoin.
        std::fprintf(stderr, "[launch] %s (started again) %s: the job had ended\n", c.name.c_str(),
                     Describe(st).c_str());
        continue;
      }
      if (c.is_worker && !ok && !job_done && opt.coordinator.continue_on_worker_loss &&
          c.name != "worker 0") {
        // The coordinator removes it and the others go on, or fails the job (seen below); with
        // --restart-workers a new process takes its rank and rejoins.
        if (restarts_left > 0) {
          --restarts_left;
          std::fprintf(stderr,
                       "[launch] %s %s; starting it again (%u restart(s) left): it rejoins the "
                       "job\n",
                       c.name.c_str(), Describe(st).c_str(), restarts_left);
          restart.push_back(static_cast<size_t>(&c - children.data()));
        } else {
          std::fprintf(stderr, "[launch] %s %s; the job goes on without it (--on-worker-loss)\n",
                       c.name.c_str(), Describe(st).c_str());
        }
        continue;
      }
      if (!ok || (!c.is_worker && !job_done)) {
        stop(fmt::format("{} {}", c.name, Describe(st)), 1);
      }
    }
    if (terminating) {  // the job is being stopped: nothing starts again
      restart.clear();
      new_servers = 0;
    }
    for (; new_servers > 0; --new_servers) {
      auto c = spawn_server(servers_started++);
      if (!c.ok()) {
        stop(c.status().ToString(), 1);
        break;
      }
      children.push_back(std::move(c).value());
    }
    for (size_t i : restart) {
      Child& old = children[i];
      if (old.out >= 0) {  // what it wrote last still shows, before the new one's lines
        Forward(old, true);
        close(old.out);
        old.out = -1;
      }
      auto c = Spawn(old.name, true, opt.program, opt.parent_env, old.env);
      if (!c.ok()) {
        stop(c.status().ToString(), 1);
        break;
      }
      c->env = old.env;
      c->restarted = true;
      children.push_back(std::move(c).value());
    }
    if (!terminating) {
      Status job = (*coord)->Wait(std::chrono::milliseconds(0));
      if (!job.ok() && !job.IsTimeout()) {
        stop("the job failed: " + job.message(), 1);
      }
    }
    bool workers_left = false, any_left = false;
    for (auto& c : children) {
      if (!c.exited) any_left = true;
      if (!c.exited && c.is_worker) workers_left = true;
    }
    if (!workers_left && !all_workers_done) {
      all_workers_done = true;
      workers_done = Clock::now();
    }
    bool pipes_open = false;
    for (auto& c : children) pipes_open |= c.out >= 0;
    if (!any_left && !pipes_open) break;
    if (!any_left && terminating) break;
    // Servers end once the coordinator tells them the job is done; do not wait forever.
    if (all_workers_done && any_left && !terminating &&
        Clock::now() - workers_done > std::chrono::seconds(5)) {
      stop((*coord)->Wait(std::chrono::milliseconds(0)).ok()
               ? "servers did not stop within 5 s after the job ended"
               : "every worker exited but the job did not end (did each worker connect with "
                 "shardps::Worker and finish?)",
           1);
    }
    if (terminating && !killed && Clock::now() - term_sent > opt.grace) {
      terminate_all(SIGKILL);
      killed = true;
    }
  }
  for (auto& c : children)
    if (c.out >= 0) close(c.out);
  if (!stop_reason.empty())
    std::fprintf(stderr, "[launch] stopping the job: %s\n", stop_reason.c_str());
  for (auto& c : children)
    if (!(WIFEXITED(c.status) && WEXITSTATUS(c.status) == 0) && exit_code != 0)
      std::fprintf(stderr, "[launch] %s %s\n", c.name.c_str(), Describe(c.status).c_str());
  coord->reset();
  sigprocmask(SIG_SETMASK, &old_mask, nullptr);
  close(sfd);
  if (!opt.timeline.empty()) MergeTimelineParts(opt);
  return exit_code;
}

}  // namespace shardps::tools
