// Prometheus metrics of a role (docs/metrics.md). Nothing is instrumented on the data path
// beyond the relaxed atomic counters the roles keep anyway: at each scrape the role's collect
// function reads them into metric families. Each role that is given an address serves
// `/metrics` (and `/healthz` once it is ready) with prometheus-cpp's exposer (civetweb).
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "shardps/status.h"

namespace prometheus {
struct MetricFamily;
}

namespace shardps::metrics {

using Labels = std::vector<std::pair<std::string, std::string>>;

// Latencies in fixed buckets (10 us to 10 s), recorded with relaxed atomics: cheap enough for
// every push and pull.
class LatencyHistogram {
 public:
  static constexpr std::array<double, 13> kBounds = {1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2,
                                                     3e-2, 0.1,  0.3,  1.0,  3.0,  10.0};
  void Observe(std::chrono::nanoseconds d);
  uint64_t count() const { return count_.load(std::memory_order_relaxed); }
  double sum_seconds() const;
  // Cumulative counts, one per bound, then the total (+Inf).
  std::vector<uint64_t> Cumulative() const;

 private:
  std::array<std::atomic<uint64_t>, kBounds.size() + 1> buckets_{};
  std::atomic<uint64_t> count_{0};
  std::atomic<uint64_t> sum_ns_{0};
};

// The families of one scrape, built by the role's collect function.
class Families {
 public:
  Families();
  ~Families();
  Families(Families&&) noexcept;
  void Counter(const std::string& name, const std::string& help, double value,
               const Labels& labels = {});
  void Gauge(const std::string& name, const std::string& help, double value,
             const Labels& labels = {});
  void Histogram(const std::string& name, const std::string& help, const LatencyHistogram& h,
                 const Labels& labels = {});
  std::vector<prometheus::MetricFamily> Take();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

using CollectFn = std::function<void(Families&)>;

// Serves one process's roles: `/metrics` gathers every registered role's families; `/healthz`
// answers 200 once a role is ready (404 before: Kubernetes' readiness probe).
class Exporter {
 public:
  // Listens on "host:port" (port 0: a free one). InvalidArgument for a malformed address,
  // Unavailable when it cannot listen there.
  static Result<std::unique_ptr<Exporter>> Start(const std::string& listen);
  ~Exporter();
  // The address it serves on, "127.0.0.1:9400" (the real port when 0 was asked for).
  std::string address() const;
  // Adds a role's collect function; `labels` (role, rank) go on every sample it gives. The
  // function runs on the exporter's threads and must be thread-safe; it is dropped (and no
  // longer called) when the returned token is destroyed.
  std::shared_ptr<void> Register(CollectFn fn, Labels labels);
  // /healthz answers 200 from now on.
  void MarkReady();

 private:
  Exporter() = default;
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// The exporter of a role: none when `listen` is empty; started, its role registered, and its
// address logged otherwise. The role keeps both.
struct RoleMetrics {
  std::unique_ptr<Exporter> exporter;
  std::shared_ptr<void> registration;
  static Result<RoleMetrics> Start(const std::string& listen, const std::string& role, int64_t rank,
                                   CollectFn fn);
  void MarkReady() {
    if (exporter) exporter->MarkReady();
  }
  std::string address() const { return exporter ? exporter->address() : std::string(); }
  // Stops serving before the role's state goes (the collect function reads it).
  void Stop() {
    registration.reset();
    exporter.reset();
  }
};

}  // namespace shardps::metrics
