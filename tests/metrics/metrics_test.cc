// The metrics exporter (src/metrics/, docs/metrics.md): histogram buckets, families merged
// over roles, /metrics and /healthz over real HTTP on 127.0.0.1, bad addresses.
#include <chrono>

#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>

#include <nlohmann/json.hpp>

#include "metrics/metrics.h"
#include "metrics/timeline.h"
#include "support/http_get.h"

namespace shardps::metrics {
namespace {

using namespace std::chrono_literals;
using shardps::testing::HttpGet;
using shardps::testing::Sample;

TEST(LatencyHistogram, CountsFallIntoTheirBucketsCumulatively) {
  LatencyHistogram h;
  h.Observe(5us);   // <= 10 us
  h.Observe(10us);  // <= 10 us (bounds are inclusive)
  h.Observe(50us);  // <= 100 us
  h.Observe(2ms);   // <= 3 ms
  h.Observe(20s);   // +Inf
  auto c = h.Cumulative();
  ASSERT_EQ(c.size(), LatencyHistogram::kBounds.size() + 1);
  EXPECT_EQ(c[0], 2u);   // 1e-5
  EXPECT_EQ(c[1], 2u);   // 3e-5
  EXPECT_EQ(c[2], 3u);   // 1e-4
  EXPECT_EQ(c[4], 3u);   // 1e-3
  EXPECT_EQ(c[5], 4u);   // 3e-3
  EXPECT_EQ(c[12], 4u);  // 10 s
  EXPECT_EQ(c[13], 5u);  // +Inf
  EXPECT_EQ(h.count(), 5u);
  EXPECT_NEAR(h.sum_seconds(), 20.002065, 1e-9);
}

TEST(Exporter, ServesEveryRoleAndHealthOnceReady) {
  auto e = Exporter::Start("127.0.0.1:0");
  ASSERT_TRUE(e.ok()) << e.status().ToString();
  const std::string addr = (*e)->address();
  EXPECT_NE(addr, "127.0.0.1:0");
  EXPECT_EQ(HttpGet(addr, "/healthz").status, 404);  // not ready yet
  LatencyHistogram h;
  h.Observe(1ms);
  auto a = (*e)->Register(
      [&](Families& f) {
        f.Counter("t_events_total", "events", 3, {{"kind", "x"}});
        f.Counter("t_events_total", "events", 4, {{"kind", "y"}});
        f.Gauge("t_depth", "depth", 7);
        f.Histogram("t_seconds", "latency", h);
      },
      {{"role", "server"}, {"rank", "0"}});
  auto b = (*e)->Register([](Families& f) { f.Gauge("t_depth", "depth", 9); },
                          {{"role", "worker"}, {"rank", "1"}});
  auto r = HttpGet(addr, "/metrics");
  ASSERT_EQ(r.status, 200) << r.body;
  EXPECT_EQ(Sample(r.body, "t_events_total", {"kind=\"x\"", "role=\"server\""}), 3.0) << r.body;
  EXPECT_EQ(Sample(r.body, "t_events_total", {"kind=\"y\""}), 4.0);
  EXPECT_EQ(Sample(r.body, "t_depth", {"role=\"server\"", "rank=\"0\""}), 7.0);
  EXPECT_EQ(Sample(r.body, "t_depth", {"role=\"worker\"", "rank=\"1\""}), 9.0);
  EXPECT_EQ(Sample(r.body, "t_seconds_count"), 1.0);
  EXPECT_EQ(Sample(r.body, "t_seconds_bucket", {"le=\"0.001\""}), 1.0);
  EXPECT_EQ(Sample(r.body, "t_seconds_bucket", {"le=\"0.0003\""}), 0.0);
  // One family per name, whichever roles gave samples of it.
  size_t types = 0;
  for (size_t at = r.body.find("# TYPE t_depth "); at != std::string::npos;
       at = r.body.find("# TYPE t_depth ", at + 1))
    ++types;
  EXPECT_EQ(types, 1u);
  (*e)->MarkReady();
  auto health = HttpGet(addr, "/healthz");
  EXPECT_EQ(health.status, 200);
  EXPECT_EQ(Sample(health.body, "shardps_ready"), 1.0);
  b.reset();  // the worker's role is gone: its samples too
  r = HttpGet(addr, "/metrics");
  EXPECT_FALSE(Sample(r.body, "t_depth", {"role=\"worker\""}).has_value()) << r.body;
  EXPECT_EQ(Sample(r.body, "t_depth", {"role=\"server\""}), 7.0);
}

TEST(Exporter, BadOrTakenAddressesAreClearErrors) {
  auto bad = Exporter::Start("no-port-here");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), Status::Code::kInvalidArgument) << bad.status().ToString();
  auto first = Exporter::Start("127.0.0.1:0");
  ASSERT_TRUE(first.ok());
  auto taken = Exporter::Start((*first)->address());
  ASSERT_FALSE(taken.ok());
  EXPECT_EQ(taken.status().code(), Status::Code::kUnavailable) << taken.status().ToString();
  auto none = RoleMetrics::Start("", "server", 0, [](Families&) {});
  ASSERT_TRUE(none.ok());
  EXPECT_EQ(none->address(), "");
}

TEST(Timeline, WritesAChromeTraceAndBoundsItsSpans) {
  const std::string path = "/tmp/shardps-timeline-test-" + std::to_string(getpid()) + ".json";
  {
    Timeline t(path, "worker \"3\"", 1003, /*max_spans=*/3);
    auto t0 = Timeline::Clock::now();
    Timeline::Args a;
    a.keys[0] = "numel";
    a.values[0] = 12;
    a.text_key = "tensor";
    a.text = std::make_shared<const std::string>(JsonEscape("a\"b"));
    t.Span("push", "worker", t0, t0 + 1500ns, 7, a);
    t.Span("wait", "worker", t0 + 100ns, t0 + 2ms, 7);
    t.Span("pull", "worker", t0 + 3ms, t0 + 4ms, 8);
    t.Span("pull", "worker", t0 + 5ms, t0 + 6ms, 8);  // past the bound: dropped
    EXPECT_EQ(t.spans(), 3u);
    EXPECT_EQ(t.dropped(), 1u);
  }  // written here
  std::ifstream in(path);
  auto j = nlohmann::json::parse(in);
  EXPECT_EQ(j["otherData"]["dropped_spans"], 1);
  std::vector<nlohmann::json> spans;
  for (auto& e : j["traceEvents"])
    if (e["ph"] == "X")
      spans.push_back(e);
    else
      EXPECT_EQ(e["ph"], "M");  // the process's name and order
  ASSERT_EQ(spans.size(), 3u);
  EXPECT_EQ(spans[0]["name"], "push");
  EXPECT_EQ(spans[0]["args"]["tensor"], "a\"b");
  EXPECT_EQ(spans[0]["args"]["numel"], 12);
  EXPECT_DOUBLE_EQ(spans[0]["dur"].get<double>(), 1.5);  // microseconds
  EXPECT_EQ(spans[0]["pid"], 1003);
  EXPECT_EQ(spans[0]["tid"], 7);
  // Absolute wall-clock microseconds: a double holds them to about 0.25 us.
  EXPECT_NEAR(spans[1]["ts"].get<double>() - spans[0]["ts"].get<double>(), 0.1, 0.5);
  EXPECT_DOUBLE_EQ(spans[1]["dur"].get<double>(), 1999.9);
  // Two files merged into one.
  const std::string other = path + ".other", merged = path + ".merged";
  {
    Timeline t(other, "server 0", 0);
    auto t0 = Timeline::Clock::now();
    t.Span("apply", "server", t0, t0 + 1us, 1);
  }
  ASSERT_TRUE(MergeTimelines({path, other}, merged).ok());
  std::ifstream min(merged);
  auto m = nlohmann::json::parse(min);
  size_t x = 0;
  for (auto& e : m["traceEvents"]) x += e["ph"] == "X";
  EXPECT_EQ(x, 4u);
  EXPECT_EQ(m["otherData"]["dropped_spans"], 1);
  EXPECT_FALSE(MergeTimelines({path + ".missing"}, merged).ok());
  std::remove(path.c_str());
  std::remove(other.c_str());
  std::remove(merged.c_str());
}

}  // namespace
}  // namespace shardps::metrics
