#include "metrics/metrics.h"

#include <map>
#include <mutex>
#include <stdexcept>

#include <fmt/format.h>
#include <prometheus/collectable.h>
#include <prometheus/exposer.h>
#include <prometheus/metric_family.h>
#include <spdlog/spdlog.h>

#include "transport/context.h"

namespace shardps::metrics {

void LatencyHistogram::Observe(std::chrono::nanoseconds d) {
  const double s = std::chrono::duration<double>(d).count();
  size_t i = 0;
  while (i < kBounds.size() && s > kBounds[i]) ++i;
  buckets_[i].fetch_add(1, std::memory_order_relaxed);
  count_.fetch_add(1, std::memory_order_relaxed);
  sum_ns_.fetch_add(static_cast<uint64_t>(std::max<int64_t>(d.count(), 0)),
                    std::memory_order_relaxed);
}

double LatencyHistogram::sum_seconds() const {
  return static_cast<double>(sum_ns_.load(std::memory_order_relaxed)) * 1e-9;
}

std::vector<uint64_t> LatencyHistogram::Cumulative() const {
  std::vector<uint64_t> out(buckets_.size());
  uint64_t run = 0;
  for (size_t i = 0; i < buckets_.size(); ++i) {
    run += buckets_[i].load(std::memory_order_relaxed);
    out[i] = run;
  }
  return out;
}

struct Families::Impl {
  std::vector<prometheus::MetricFamily> families;
  std::map<std::string, size_t> by_name;

  prometheus::ClientMetric& Add(const std::string& name, const std::string& help,
                                prometheus::MetricType type, const Labels& labels) {
    auto it = by_name.find(name);
    if (it == by_name.end()) {
      prometheus::MetricFamily f;
      f.name = name;
      f.help = help;
      f.type = type;
      families.push_back(std::move(f));
      it = by_name.emplace(name, families.size() - 1).first;
    }
    auto& f = families[it->second];
    f.metric.emplace_back();
    for (auto& [k, v] : labels) f.metric.back().label.push_back({k, v});
    return f.metric.back();
  }
};

Families::Families() : impl_(std::make_unique<Impl>()) {}
Families::~Families() = default;
Families::Families(Families&&) noexcept = default;

void Families::Counter(const std::string& name, const std::string& help, double value,
                       const Labels& labels) {
  impl_->Add(name, help, prometheus::MetricType::Counter, labels).counter.value = value;
}

void Families::Gauge(const std::string& name, const std::string& help, double value,
                     const Labels& labels) {
  impl_->Add(name, help, prometheus::MetricType::Gauge, labels).gauge.value = value;
}

void Families::Histogram(const std::string& name, const std::string& help,
                         const LatencyHistogram& h, const Labels& labels) {
  auto& m = impl_->Add(name, help, prometheus::MetricType::Histogram, labels);
  auto cum = h.Cumulative();
  m.histogram.sample_count = cum.back();
  m.histogram.sample_sum = h.sum_seconds();
  for (size_t i = 0; i < LatencyHistogram::kBounds.size(); ++i)
    m.histogram.bucket.push_back({cum[i], LatencyHistogram::kBounds[i]});
  m.histogram.bucket.push_back({cum.back(), std::numeric_limits<double>::infinity()});
}

std::vector<prometheus::MetricFamily> Families::Take() { return std::move(impl_->families); }

namespace {

// What /metrics serves: every registered role's families, merged by name.
class Roles final : public prometheus::Collectable {
 public:
  struct Entry {
    CollectFn fn;
    Labels labels;
  };
  std::shared_ptr<void> Add(CollectFn fn, Labels labels) {
    auto e = std::make_shared<Entry>(Entry{std::move(fn), std::move(labels)});
    std::lock_guard<std::mutex> lock(mu_);
    entries_.push_back(e);
    return e;
  }
  std::vector<prometheus::MetricFamily> Collect() const override {
    std::vector<std::shared_ptr<Entry>> live;
    {
      std::lock_guard<std::mutex> lock(mu_);
      for (auto it = entries_.begin(); it != entries_.end();) {
        if (auto e = it->lock()) {
          live.push_back(std::move(e));
          ++it;
        } else {
          it = entries_.erase(it);
        }
      }
    }
    std::vector<prometheus::MetricFamily> out;
    std::map<std::string, size_t> by_name;
    for (auto& e : live) {
      Families f;
      e->fn(f);
      for (auto& fam : f.Take()) {
        for (auto& m : fam.metric)
          for (auto& [k, v] : e->labels) m.label.push_back({k, v});
        auto it = by_name.find(fam.name);
        if (it == by_name.end()) {
          by_name.emplace(fam.name, out.size());
          out.push_back(std::move(fam));
        } else {
          auto& into = out[it->second].metric;
          into.insert(into.end(), fam.metric.begin(), fam.metric.end());
        }
      }
    }
    return out;
  }

 private:
  mutable std::mutex mu_;
  mutable std::vector<std::weak_ptr<Entry>> entries_;
};

// What /healthz serves once ready: one gauge.
class Ready final : public prometheus::Collectable {
 public:
  std::vector<prometheus::MetricFamily> Collect() const override {
    prometheus::MetricFamily f;
    f.name = "shardps_ready";
    f.help = "1: this process's roles are ready";
    f.type = prometheus::MetricType::Gauge;
    f.metric.emplace_back();
    f.metric.back().gauge.value = 1;
    return {f};
  }
};

}  // namespace

struct Exporter::Impl {
  std::unique_ptr<prometheus::Exposer> exposer;
  std::shared_ptr<Roles> roles = std::make_shared<Roles>();
  std::shared_ptr<Ready> ready = std::make_shared<Ready>();
  std::once_flag ready_once;
  std::string address;
};

Result<std::unique_ptr<Exporter>> Exporter::Start(const std::string& listen) {
  std::string host;
  uint16_t port = 0;
  SHARDPS_RETURN_IF_ERROR(transport::ParseHostPort(listen, &host, &port));
  if (host.empty() || host == "*") host = "0.0.0.0";
  std::unique_ptr<Exporter> e(new Exporter());
  e->impl_ = std::make_unique<Impl>();
  try {
    e->impl_->exposer = std::make_unique<prometheus::Exposer>(fmt::format("{}:{}", host, port), 2);
  } catch (const std::exception& ex) {
    return Status::Unavailable(fmt::format("cannot serve metrics on {}: {}", listen, ex.what()));
  }
  auto ports = e->impl_->exposer->GetListeningPorts();
  if (ports.empty()) return Status::Unavailable(fmt::format("metrics on {}: no port", listen));
  e->impl_->address = fmt::format("{}:{}", host, ports.front());
  e->impl_->exposer->RegisterCollectable(e->impl_->roles);
  return e;
}

Exporter::~Exporter() = default;

std::string Exporter::address() const { return impl_->address; }

std::shared_ptr<void> Exporter::Register(CollectFn fn, Labels labels) {
  return impl_->roles->Add(std::move(fn), std::move(labels));
}

void Exporter::MarkReady() {
  std::call_once(impl_->ready_once,
                 [this] { impl_->exposer->RegisterCollectable(impl_->ready, "/healthz"); });
}

Result<RoleMetrics> RoleMetrics::Start(const std::string& listen, const std::string& role,
                                       int64_t rank, CollectFn fn) {
  RoleMetrics m;
  if (listen.empty()) return m;
  auto e = Exporter::Start(listen);
  if (!e.ok()) return e.status().WithContext(role);
  m.exporter = std::move(e).value();
  Labels labels = {{"role", role}};
  if (rank >= 0) labels.push_back({"rank", std::to_string(rank)});
  m.registration = m.exporter->Register(std::move(fn), std::move(labels));
  spdlog::info("{}{}: Prometheus metrics on http://{}/metrics", role,
               rank >= 0 ? fmt::format(" {}", rank) : "", m.exporter->address());
  return m;
}

}  // namespace shardps::metrics
