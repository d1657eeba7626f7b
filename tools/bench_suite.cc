// `shardps bench --suite quick|full` (docs/perf.md, "The benchmark suite"): runs the scenarios
// below, each as its own `shardps bench` job on 127.0.0.1 repeated a few times, beside baselines
// measured in the same run, and reports each scenario's median, spread and ratio to the
// baseline that bounds it.
//
// Scenarios (quick | full):
//   single:   push, pull, push_pull; 1 worker, 1 server, tcp;
//             sizes 4 KiB, 1 MiB, 64 MiB | 4 KiB, 64 KiB, 1 MiB, 16 MiB, 64 MiB, 256 MiB
//   ucx:      the same over ucx where it is viable: push_pull | push, pull, push_pull
//   scaling:  push_pull of 16 MiB, tcp; 1, 2, 4 workers x 1, 2 servers | 1, 2, 4, 8 workers x
//             1, 2, 4 servers
//   codecs:   push_pull of 4 MiB, 1 worker, 1 server, tcp, every codec: fp16, bf16, int8,
//             onebit, topk:1%
//   small:    many small tensors, push_pull, 4 workers, 2 servers, tcp: 10,000 tensors of 256 B
//             | of 64 B, 256 B, 1 KiB and 4 KiB; reported as tensor updates per second
//
// Baselines (measured by this process before and between nothing else runs):
//   tcp_exchange:  a request of N bytes and a short reply between two processes (push), a short
//                  request and N bytes back (pull), N bytes both ways (push_pull), median of
//                  many; bounds the single and codec scenarios (codecs: N uncompressed)
//   tcp_streams:   K raw TCP streams between K pairs of processes at once, summed; bounds the
//                  scaling scenarios with K = workers
//   ucx_perftest:  below 1 MiB, latency bounds: ucp_put_lat at N bytes, a ping-pong of puts,
//                  whose round trip (twice the one-way latency it reports) is one exchange of
//                  N bytes (push and pull one exchange, push_pull two); from 1 MiB, bandwidth
//                  bounds: ucp_put_bw (push), ucp_get (pull), one of each (push_pull)
//   memcpy:        N bytes copied in this process, reported beside the others
//   small:         one tcp exchange of (tensors x size) bytes both ways per worker: what a
//                  perfectly batched step could do
// Each tcp baseline is the median of 3 measurements. Scenarios run 5 times (quick) or 7 (full);
// one whose runs spread by more than 25% of their median is flagged as too noisy.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <string>
#include <vector>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "bench.h"
#include "core/subprocess.h"
#include "launch.h"
#include "train/plot.h"
#include "transport/context.h"

namespace shardps::tools {
namespace {

using Clock = std::chrono::steady_clock;
using json = nlohmann::json;

constexpr double kNoisySpread = 0.25;

struct Scenario {
  std::string group;  // single, ucx, scaling, codecs, small
  std::string op = "pushpull";
  uint64_t size = 0;
  uint32_t tensors = 1;
  uint32_t workers = 1, servers = 1;
  std::string transport = "tcp";
  std::string compression = "none";
  uint32_t iters = 20, warmup = 3;
};

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
}

// Enough iterations for a stable figure in bounded time: about `bytes_budget` moved, within
// [lo, hi].
uint32_t ItersFor(uint64_t size, uint64_t bytes_budget, uint32_t lo, uint32_t hi) {
  return static_cast<uint32_t>(
      std::clamp<uint64_t>(bytes_budget / std::max<uint64_t>(size, 1), lo, hi));
}

std::string SizeName(uint64_t b) {
  if (b >= (1ull << 20) && b % (1ull << 20) == 0) return fmt::format("{}MiB", b >> 20);
  if (b >= 1024 && b % 1024 == 0) return fmt::format("{}KiB", b >> 10);
  return fmt::format("{}B", b);
}

std::vector<Scenario> Scenarios(bool full, bool ucx) {
  std::vector<Scenario> out;
  const std::vector<uint64_t> sizes =
      full ? std::vector<uint64_t>{4 << 10, 64 << 10, 1 << 20, 16 << 20, 64 << 20, 256 << 20}
           : std::vector<uint64_t>{4 << 10, 1 << 20, 64 << 20};
  const uint32_t hi = full ? 2000 : 500;
  for (const char* op : {"push", "pull", "pushpull"})
    for (uint64_t s : sizes) {
      Scenario c{.group = "single", .op = op, .size = s};
      c.iters = ItersFor(s, full ? (2ull << 30) : (1ull << 30), 8, hi);
      c.warmup = std::max<uint32_t>(2, c.iters / 10);
      out.push_back(c);
    }
  if (ucx)
    for (const char* op : {"push", "pull", "pushpull"}) {
      if (!full && std::string(op) != "pushpull") continue;
      for (uint64_t s : sizes) {
        Scenario c{.group = "ucx", .op = op, .size = s, .transport = "ucx"};
        c.iters = ItersFor(s, full ? (2ull << 30) : (1ull << 30), 8, hi);
        c.warmup = std::max<uint32_t>(2, c.iters / 10);
        out.push_back(c);
      }
    }
  std::vector<std::pair<uint32_t, uint32_t>> grid = {{1, 1}, {2, 1}, {4, 1},
                                                     {1, 2}, {2, 2}, {4, 2}};
  if (full) {
    grid.clear();
    for (uint32_t w : {1u, 2u, 4u, 8u})
      for (uint32_t s : {1u, 2u, 4u}) grid.push_back({w, s});
  }
  for (auto [w, s] : grid)
    out.push_back(Scenario{.group = "scaling",
                           .size = 16 << 20,
                           .workers = w,
                           .servers = s,
                           .iters = full ? 20u : 10u,
                           .warmup = 2});
  for (const char* codec : {"fp16", "bf16", "int8", "onebit", "topk:1%"})
    out.push_back(Scenario{.group = "codecs",
                           .size = 4 << 20,
                           .compression = codec,
                           .iters = full ? 100u : 40u,
                           .warmup = 5});
  const std::vector<uint64_t> small =
      full ? std::vector<uint64_t>{64, 256, 1024, 4096} : std::vector<uint64_t>{256};
  for (uint64_t s : small)
    out.push_back(Scenario{.group = "small",
                           .size = s,
                           .tensors = 10000,
                           .workers = 4,
                           .servers = 2,
                           .iters = full ? 5u : 3u,
                           .warmup = 1});
  return out;
}

std::string Label(const Scenario& c) {
  std::string l =
      fmt::format("{} {} {} {}w{}s", c.transport, c.op, SizeName(c.size), c.workers, c.servers);
  if (c.tensors > 1) l += fmt::format(" x{}", c.tensors);
  if (c.compression != "none") l += " " + c.compression;
  return l;
}

// --- baselines ------------------------------------------------------------------------------

bool SendAll(int fd, const char* p, uint64_t n) {
  while (n > 0) {
    ssize_t k = send(fd, p, std::min<uint64_t>(n, 4 << 20), MSG_NOSIGNAL);
    if (k <= 0) return false;
    p += k;
    n -= static_cast<uint64_t>(k);
  }
  return true;
}

bool RecvAll(int fd, char* p, uint64_t n) {
  while (n > 0) {
    ssize_t k = recv(fd, p, std::min<uint64_t>(n, 4 << 20), 0);
    if (k <= 0) return false;
    p += k;
    n -= static_cast<uint64_t>(k);
  }
  return true;
}

// Median microseconds of a request of `req` bytes answered by `rep` bytes, between this process
// and a forked one over loopback (TCP_NODELAY both ways), after a few untimed ones.
Result<double> TcpExchangeOnceUs(uint64_t req, uint64_t rep, uint32_t iters) {
  sockaddr_in a{};
  SHARDPS_ASSIGN_OR_RETURN(int ls, ListenOnLoopback(&a));
  const uint32_t warm = std::max<uint32_t>(2, iters / 10);
  pid_t pid = fork();
  if (pid < 0) {
    close(ls);
    return Status::FromErrno("fork", errno);
  }
  if (pid == 0) {
    alarm(300);
    int c = accept(ls, nullptr, nullptr);
    if (c < 0) _exit(1);
    int one = 1;
    setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    std::vector<char> in(req), out(rep, 2);
    for (uint32_t i = 0; i < warm + iters; ++i)
      if (!RecvAll(c, in.data(), req) || !SendAll(c, out.data(), rep)) _exit(2);
    _exit(0);
  }
  close(ls);
  int s = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int one = 1;
  setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  std::vector<double> us;
  bool ok = s >= 0 && connect(s, reinterpret_cast<sockaddr*>(&a), sizeof(a)) == 0;
  std::vector<char> out(req, 1), in(rep);
  for (uint32_t i = 0; ok && i < warm + iters; ++i) {
    auto t0 = Clock::now();
    ok = SendAll(s, out.data(), req) && RecvAll(s, in.data(), rep);
    if (i >= warm)
      us.push_back(std::chrono::duration<double, std::micro>(Clock::now() - t0).count());
  }
  if (s >= 0) close(s);
  int st = 0;
  waitpid(pid, &st, 0);
  if (!ok || us.size() != iters) return Status::IOError("exchange baseline ended early");
  return Median(us);
}

// The median of three measurements (each its own pair of processes): a baseline that one
// unlucky moment on a shared machine does not move.
Result<double> TcpExchangeUs(uint64_t req, uint64_t rep, uint32_t iters) {
  std::vector<double> v;
  for (int i = 0; i < 3; ++i) {
    auto us = TcpExchangeOnceUs(req, rep, iters);
    if (!us.ok()) return us.status();
    v.push_back(*us);
  }
  return Median(v);
}

// K raw TCP streams at once (K forked measurers, each a pair of processes), summed Gbit/s.
Result<double> TcpStreamsGbps(uint32_t k, uint64_t bytes_each) {
  std::vector<std::pair<pid_t, int>> kids;
  for (uint32_t i = 0; i < k; ++i) {
    int fds[2];
    if (pipe2(fds, O_CLOEXEC) != 0) return Status::FromErrno("pipe", errno);
    pid_t pid = fork();
    if (pid < 0) return Status::FromErrno("fork", errno);
    if (pid == 0) {
      close(fds[0]);
      alarm(300);
      auto g = MeasureTcpStreamGbps(bytes_each);
      double v = g.ok() ? *g : -1;
      [[maybe_unused]] ssize_t w = write(fds[1], &v, sizeof(v));
      _exit(0);
    }
    close(fds[1]);
    kids.push_back({pid, fds[0]});
  }
  double sum = 0;
  bool ok = true;
  for (auto [pid, fd] : kids) {
    double v = -1;
    if (read(fd, &v, sizeof(v)) != sizeof(v) || v < 0) ok = false;
    sum += v;
    close(fd);
    int st = 0;
    waitpid(pid, &st, 0);
  }
  if (!ok) return Status::IOError("a parallel stream baseline failed");
  return sum;
}

// memcpy of `n` bytes in this process, GB/s (best of 3 rounds of at least 256 MiB each).
double MemcpyGBps(uint64_t n) {
  std::vector<char> a(n, 1), b(n);
  const uint64_t reps = std::max<uint64_t>(1, (256ull << 20) / n);
  double best = 0;
  for (int r = 0; r < 3; ++r) {
    auto t0 = Clock::now();
    for (uint64_t i = 0; i < reps; ++i) {
      std::memcpy(b.data(), a.data(), n);
      a[i % n] = b[(i * 7) % n];  // keeps the copies from being elided
    }
    double secs = std::chrono::duration<double>(Clock::now() - t0).count();
    best = std::max(best, static_cast<double>(n * reps) / secs / 1e9);
  }
  return best;
}

// --- running -----------------------------------------------------------------------------------

struct RunResult {
  double metric = 0;  // Gbit/s, or tensor updates per second (small)
  double p50_us = 0, p99_us = 0;
  uint64_t server_rss = 0;
};

Result<RunResult> RunOnce(const Scenario& c, const std::string& report) {
  std::vector<std::string> argv = {
      SelfExe(),
      "--log-level",
      "warn",
      "bench",
      "--servers",
      std::to_string(c.servers),
      "--workers",
      std::to_string(c.workers),
      "--transport",
      c.transport,
      "--op",
      c.op,
      "--size",
      std::to_string(c.size),
      "--tensors",
      std::to_string(c.tensors),
      "--iters",
      std::to_string(c.iters),
      "--warmup",
      std::to_string(c.warmup),
      "--compression",
      c.compression,
      "--chunk-size",
      c.size > (4 << 20) ? "4MiB" : SizeName(std::max<uint64_t>(c.size, 64)),
      "--no-baseline",
      "--replicas",
      "0",
      "--report",
      report};
  // --replicas 0: the suite measures the data path, one copy of each chunk, as its earlier
  // figures in docs/perf.md did; the cost of a backup is measured by perf/tcp.sh.
  if (c.size >= (64 << 20)) argv.insert(argv.end(), {"--landing-buffers", "4"});
  auto r = RunCommand(argv, std::chrono::seconds(600));
  if (r.timed_out) return Status::Timeout(Label(c) + ": no result within 600 s");
  if (r.exit_code != 0)
    return Status::Internal(
        fmt::format("{}: exit status {}: {}", Label(c), r.exit_code,
                    r.output.substr(r.output.size() > 1500 ? r.output.size() - 1500 : 0)));
  std::ifstream f(report);
  json j = json::parse(f, nullptr, false);
  if (j.is_discarded() || !j.contains("scenarios") || j["scenarios"].empty())
    return Status::Internal(Label(c) + ": no readable report");
  const json& s = j["scenarios"][0];
  RunResult out;
  out.p50_us = s.value("p50_us", 0.0);
  out.p99_us = s.value("p99_us", 0.0);
  out.server_rss = s.value("server_peak_rss_bytes", uint64_t{0});
  if (c.group == "small") {
    double secs = 0;
    for (double us : s["latencies_us"]) secs += us / 1e6;
    out.metric = secs > 0 ? static_cast<double>(c.tensors) * c.workers * c.iters / secs : 0;
  } else if (c.group == "codecs") {
    out.metric = s.value("gradient_gbps", 0.0);
  } else {
    out.metric = s.value("gbps", 0.0) * c.workers;  // the aggregate over the workers in step
  }
  return out;
}

uint64_t ReqBytes(const std::string& op, uint64_t n) { return op == "pull" ? 16 : n; }
uint64_t RepBytes(const std::string& op, uint64_t n) { return op == "push" ? 16 : n; }

std::string DataFile(const std::string& dir, const std::string& name, const std::string& text) {
  std::string path = (std::filesystem::path(dir) / name).string();
  std::ofstream(path) << text;
  return path;
}

Status Plots(const std::string& dir, const json& scenarios, const json& baselines) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  // Throughput and latency against size, push_pull, 1 worker, 1 server, per transport.
  std::map<std::string, std::string> tput, lat;
  for (const auto& s : scenarios) {
    if (s["group"] != "single" && s["group"] != "ucx") continue;
    if (s["op"] != "pushpull") continue;
    const std::string t = s["transport"];
    tput[t] += fmt::format("{} {} {}\n", s["size_bytes"].get<uint64_t>(), s["median"].get<double>(),
                           s["baseline_value"].get<double>());
    lat[t] += fmt::format("{} {} {}\n", s["size_bytes"].get<uint64_t>(), s["p50_us"].get<double>(),
                          s["p99_us"].get<double>());
  }
  std::string plot_t, plot_l;
  for (const auto& [t, text] : tput) {
    std::string f = DataFile(dir, "throughput-" + t + ".dat", text);
    if (!plot_t.empty()) plot_t += ", ";
    plot_t += fmt::format(
        "{} using 1:2 with linespoints title '{} push_pull', {} using 1:3 "
        "with lines dashtype 2 title '{} baseline'",
        train::GnuplotQuote(f), t, train::GnuplotQuote(f), t);
    std::string fl = DataFile(dir, "latency-" + t + ".dat", lat[t]);
    if (!plot_l.empty()) plot_l += ", ";
    plot_l += fmt::format(
        "{} using 1:2 with linespoints title '{} p50', {} using 1:3 with "
        "linespoints title '{} p99'",
        train::GnuplotQuote(fl), t, train::GnuplotQuote(fl), t);
  }
  auto head = [&](const std::string& png, const std::string& title, const std::string& ylabel) {
    return fmt::format(
        "set terminal pngcairo size 900,560 noenhanced\nset output {}\nset title {}\n"
        "set logscale x 2\nset format x '%.0b %BB'\nset xlabel 'bytes per tensor'\n"
        "set ylabel {}\nset grid\nset key left top\n",
        train::GnuplotQuote((std::filesystem::path(dir) / png).string()),
        train::GnuplotQuote(title), train::GnuplotQuote(ylabel));
  };
  if (!plot_t.empty()) {
    SHARDPS_RETURN_IF_ERROR(train::DrawPng(
        (std::filesystem::path(dir) / "throughput.png").string(),
        head("throughput.png", "push_pull, 1 worker, 1 server (bytes both ways)", "Gbit/s") +
            "set logscale y 10\nplot " + plot_t + "\n"));
    SHARDPS_RETURN_IF_ERROR(train::DrawPng(
        (std::filesystem::path(dir) / "latency.png").string(),
        head("latency.png", "push_pull latency, 1 worker, 1 server", "microseconds") +
            "set logscale y 10\nplot " + plot_l + "\n"));
  }
  // Aggregate throughput and server memory against workers, one line per server count.
  std::map<uint32_t, std::string> by_servers;
  for (const auto& s : scenarios)
    if (s["group"] == "scaling")
      by_servers[s["servers"].get<uint32_t>()] +=
          fmt::format("{} {} {}\n", s["workers"].get<uint32_t>(), s["median"].get<double>(),
                      s["server_peak_rss_bytes"].get<double>() / (1 << 20));
  if (!by_servers.empty()) {
    std::string a, m;
    for (const auto& [servers, text] : by_servers) {
      std::string f = DataFile(dir, fmt::format("scaling-{}servers.dat", servers), text);
      if (!a.empty()) a += ", ";
      if (!m.empty()) m += ", ";
      a += fmt::format("{} using 1:2 with linespoints title '{} servers'", train::GnuplotQuote(f),
                       servers);
      m += fmt::format("{} using 1:3 with linespoints title '{} servers'", train::GnuplotQuote(f),
                       servers);
    }
    std::string streams;
    for (const auto& b : baselines)
      if (b["kind"] == "tcp_streams")
        streams += fmt::format("{} {}\n", b["streams"].get<uint32_t>(), b["gbps"].get<double>());
    const std::string sf = DataFile(dir, "scaling-streams.dat", streams);
    std::string script = fmt::format(
        "set terminal pngcairo size 1200,480 noenhanced\nset output {}\n"
        "set multiplot layout 1,2 title 'push_pull of 16 MiB over tcp'\nset grid\n"
        "set xlabel 'workers'\nset key left top\nset xrange [0.5:*]\nset yrange [0:*]\n"
        "set pointsize 1.5\nset ylabel 'aggregate Gbit/s (bytes both ways)'\n"
        "plot {}, {} using 1:2 with linespoints dashtype 2 title 'as many raw tcp streams'\n"
        "set ylabel 'server peak RSS, MiB'\nplot {}\nunset multiplot\n",
        train::GnuplotQuote((std::filesystem::path(dir) / "scaling.png").string()), a,
        train::GnuplotQuote(sf), m);
    SHARDPS_RETURN_IF_ERROR(
        train::DrawPng((std::filesystem::path(dir) / "scaling.png").string(), script));
  }
  return Status::OK();
}

}  // namespace

int RunBenchSuite(const std::string& suite, const std::string& report,
                  const std::string& plot_dir) {
  const bool full = suite == "full";
  const bool ucx = transport::CheckViability("ucx").viable;
  const auto scenarios = Scenarios(full, ucx);
  const uint32_t repeats = full ? 7 : 5;
  const auto t_start = Clock::now();
  std::printf("bench suite %s: %zu scenarios x %u repeats%s\n", suite.c_str(), scenarios.size(),
              repeats, ucx ? "" : " (ucx not viable here: its scenarios are left out)");
  std::fflush(stdout);

  // Baselines, keyed by what they bound.
  json baselines = json::array();
  std::map<std::string, double> base;  // key -> value (Gbit/s or updates/s)
  auto key_of = [](const Scenario& c) {
    if (c.group == "scaling") return fmt::format("streams:{}", c.workers);
    if (c.group == "ucx") return fmt::format("ucx:{}:{}", c.op, c.size);
    if (c.group == "small") return fmt::format("small:{}:{}:{}", c.size, c.tensors, c.workers);
    return fmt::format("exchange:{}:{}", c.op, c.size);
  };
  for (const auto& c : scenarios) {
    const std::string k = key_of(c);
    if (base.count(k)) continue;
    Status err;
    if (c.group == "scaling") {
      std::vector<double> runs;
      Result<double> g = 0.0;
      for (int i = 0; i < 3 && g.ok(); ++i) {
        g = TcpStreamsGbps(c.workers, 1ull << 30);
        if (g.ok()) runs.push_back(*g);
      }
      if (g.ok()) g = Median(runs);
      if (!g.ok())
        err = g.status();
      else {
        base[k] = *g;
        baselines.push_back({{"kind", "tcp_streams"}, {"streams", c.workers}, {"gbps", *g}});
      }
    } else if (c.group == "ucx") {
      uint32_t it = c.size >= (1 << 20) ? 200 : 10000;
      auto lat = RunUcxPerftest("ucp_put_lat", c.size, it);
      if (!lat.ok()) err = lat.status();
      const bool large = c.size >= (1 << 20);
      Result<PerftestResult> put = PerftestResult{}, get = PerftestResult{};
      if (err.ok() && large) {
        put = RunUcxPerftest("ucp_put_bw", c.size, it);
        get = RunUcxPerftest("ucp_get", c.size, it);
        if (!put.ok() || !get.ok()) err = !put.ok() ? put.status() : get.status();
      }
      if (err.ok()) {
        const double rtt_us = 2 * lat->latency_us;
        const double exchanges = c.op == "pushpull" ? 2 : 1;
        const uint64_t moved = c.op == "pushpull" ? 2 * c.size : c.size;
        const double by_latency = static_cast<double>(moved) * 8 / (exchanges * rtt_us / 1e6) / 1e9;
        const double by_bandwidth = !large           ? 0
                                    : c.op == "push" ? put->gbps
                                    : c.op == "pull" ? get->gbps
                                                     : 2.0 / (1.0 / put->gbps + 1.0 / get->gbps);
        const double v = large ? by_bandwidth : by_latency;
        base[k] = v;
        baselines.push_back({{"kind", large ? "ucx_perftest_bandwidth" : "ucx_perftest_latency"},
                             {"op", c.op},
                             {"size_bytes", c.size},
                             {"put_round_trip_us", rtt_us},
                             {"by_latency_gbps", by_latency},
                             {"by_bandwidth_gbps", by_bandwidth},
                             {"gbps", v}});
      }
    } else if (c.group == "small") {
      const uint64_t bytes = c.size * c.tensors;
      auto us = TcpExchangeUs(bytes, bytes, 200);
      if (!us.ok())
        err = us.status();
      else {
        double v = static_cast<double>(c.tensors) * c.workers / (*us / 1e6);
        base[k] = v;
        baselines.push_back({{"kind", "tcp_exchange_batched"},
                             {"size_bytes", c.size},
                             {"tensors", c.tensors},
                             {"exchange_us", *us},
                             {"updates_per_second", v}});
      }
    } else {
      const uint64_t req = ReqBytes(c.op, c.size), rep = RepBytes(c.op, c.size);
      auto us = TcpExchangeUs(req, rep, ItersFor(c.size, 1ull << 30, 5, 2000));
      if (!us.ok())
        err = us.status();
      else {
        const uint64_t moved = c.op == "pushpull" ? 2 * c.size : c.size;
        double v = static_cast<double>(moved) * 8 / (*us / 1e6) / 1e9;
        base[k] = v;
        baselines.push_back({{"kind", "tcp_exchange"},
                             {"op", c.op},
                             {"size_bytes", c.size},
                             {"request_bytes", req},
                             {"reply_bytes", rep},
                             {"p50_us", *us},
                             {"gbps", v},
                             {"memcpy_gbytes_per_s", MemcpyGBps(c.size)}});
      }
    }
    if (!err.ok()) {
      std::fprintf(stderr, "shardps bench --suite: baseline %s: %s\n", k.c_str(),
                   err.ToString().c_str());
      return 1;
    }
  }

  auto tmp = std::filesystem::temp_directory_path() /
             fmt::format("shardps-suite-{}", static_cast<long>(getpid()));
  std::filesystem::create_directories(tmp);
  json results = json::array();
  int flagged = 0;
  std::printf("%-34s %14s %9s %10s %10s %7s\n", "scenario", "median", "spread", "p50 us",
              "baseline", "ratio");
  for (const auto& c : scenarios) {
    std::vector<double> metric, p50, p99;
    uint64_t rss = 0;
    for (uint32_t r = 0; r < repeats; ++r) {
      auto one = RunOnce(c, (tmp / "run.json").string());
      if (!one.ok()) {
        std::fprintf(stderr, "shardps bench --suite: %s\n", one.status().ToString().c_str());
        std::filesystem::remove_all(tmp);
        return 1;
      }
      metric.push_back(one->metric);
      p50.push_back(one->p50_us);
      p99.push_back(one->p99_us);
      rss = std::max(rss, one->server_rss);
    }
    const double med = Median(metric);
    const double spread = med > 0 ? (*std::max_element(metric.begin(), metric.end()) -
                                     *std::min_element(metric.begin(), metric.end())) /
                                        med
                                  : 0;
    const bool noisy = spread > kNoisySpread;
    flagged += noisy ? 1 : 0;
    const double b = base[key_of(c)];
    const double ratio = b > 0 ? med / b : 0;
    const std::string unit = c.group == "small" ? "updates/s" : "Gbit/s";
    std::printf("%-34s %9.2f %-4s %8.0f%% %10.0f %10.4g %7.3g%s\n", Label(c).c_str(), med,
                c.group == "small" ? "u/s" : "Gb/s", spread * 100, Median(p50), b, ratio,
                noisy ? "  TOO NOISY" : "");
    std::fflush(stdout);
    results.push_back({{"label", Label(c)},
                       {"group", c.group},
                       {"op", c.op},
                       {"size_bytes", c.size},
                       {"tensors", c.tensors},
                       {"workers", c.workers},
                       {"servers", c.servers},
                       {"transport", c.transport},
                       {"compression", c.compression},
                       {"iters", c.iters},
                       {"repeats", repeats},
                       {"unit", unit},
                       {"values", metric},
                       {"median", med},
                       {"spread", spread},
                       {"too_noisy", noisy},
                       {"p50_us", Median(p50)},
                       {"p99_us", Median(p99)},
                       {"server_peak_rss_bytes", rss},
                       {"baseline_key", key_of(c)},
                       {"baseline_value", b},
                       {"ratio_to_baseline", ratio}});
  }
  std::filesystem::remove_all(tmp);
  const double secs = std::chrono::duration<double>(Clock::now() - t_start).count();
  std::printf(
      "bench suite %s: %zu scenarios in %.0f s; %d flagged as too noisy (spread over "
      "%.0f%%)\n",
      suite.c_str(), scenarios.size(), secs, flagged, kNoisySpread * 100);
  json out = {{"suite", suite},
              {"repeats", repeats},
              {"seconds", secs},
              {"noisy_spread", kNoisySpread},
              {"cpus", sysconf(_SC_NPROCESSORS_ONLN)},
              {"baselines", baselines},
              {"scenarios", results}};
  if (!report.empty()) {
    std::ofstream f(report);
    f << out.dump(2) << "\n";
    if (!f) {
      std::fprintf(stderr, "shardps bench --suite: cannot write %s\n", report.c_str());
      return 1;
    }
    std::printf("bench suite: report in %s\n", report.c_str());
  }
  if (!plot_dir.empty()) {
    Status st = Plots(plot_dir, results, baselines);
    if (!st.ok()) {
      std::fprintf(stderr, "shardps bench --suite: plots: %s\n", st.ToString().c_str());
      return 1;
    }
    std::printf("bench suite: plots in %s (throughput.png, latency.png, scaling.png)\n",
                plot_dir.c_str());
  }
  return 0;
}

}  // namespace shardps::tools
