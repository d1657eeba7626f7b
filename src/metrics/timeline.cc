#include "metrics/timeline.h"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include <fmt/format.h>
#include <spdlog/spdlog.h>
#include <nlohmann/json.hpp>

namespace shardps::metrics {

Timeline::Timeline(std::string path, std::string process, uint32_t pid, size_t max_spans)
    : path_(std::move(path)),
      process_(std::move(process)),
      pid_(pid),
      max_spans_(max_spans),
      wall0_us_(std::chrono::duration_cast<std::chrono::microseconds>(
                    std::chrono::system_clock::now().time_since_epoch())
                    .count()) {}

Timeline::~Timeline() {
  Status st = Write();
  if (!st.ok()) spdlog::error("timeline: {}", st.ToString());
}

void Timeline::Span(const char* name, const char* category, Clock::time_point start,
                    Clock::time_point end, uint64_t tid, Args args) {
  const int64_t ts = std::chrono::duration_cast<std::chrono::nanoseconds>(start - steady0_).count();
  const int64_t dur = std::chrono::duration_cast<std::chrono::nanoseconds>(end - start).count();
  std::lock_guard<std::mutex> lock(mu_);
  if (events_.size() >= max_spans_) {
    ++dropped_;
    return;
  }
  events_.push_back(Event{name, category, ts, dur, tid, std::move(args)});
}

size_t Timeline::spans() const {
  std::lock_guard<std::mutex> lock(mu_);
  return events_.size();
}

uint64_t Timeline::dropped() const {
  std::lock_guard<std::mutex> lock(mu_);
  return dropped_;
}

std::string JsonEscape(const std::string& s) {
  std::string j = nlohmann::json(s).dump();
  return j.substr(1, j.size() - 2);
}

Status Timeline::Write() {
  std::lock_guard<std::mutex> lock(mu_);
  if (written_) return Status::OK();
  written_ = true;
  std::FILE* f = std::fopen(path_.c_str(), "w");
  if (!f)
    return Status::IOError(
        fmt::format("cannot write the timeline '{}': {}", path_, std::strerror(errno)));
  fmt::print(f, "{{\"displayTimeUnit\":\"ns\",\"otherData\":{{\"dropped_spans\":{}}},", dropped_);
  fmt::print(f, "\"traceEvents\":[\n");
  fmt::print(f,
             "{{\"name\":\"process_name\",\"ph\":\"M\",\"pid\":{},\"tid\":0,"
             "\"args\":{{\"name\":\"{}\"}}}}",
             pid_, JsonEscape(process_));
  fmt::print(f,
             ",\n{{\"name\":\"process_sort_index\",\"ph\":\"M\",\"pid\":{},\"tid\":0,"
             "\"args\":{{\"sort_index\":{}}}}}",
             pid_, pid_);
  std::string args;
  for (const Event& e : events_) {
    args.clear();
    for (int k = 0; k < 3 && e.args.keys[k]; ++k)
      args += fmt::format("{}\"{}\":{}", args.empty() ? "" : ",", e.args.keys[k], e.args.values[k]);
    if (e.args.text_key && e.args.text)
      args +=
          fmt::format("{}\"{}\":\"{}\"", args.empty() ? "" : ",", e.args.text_key, *e.args.text);
    // Microseconds with nanosecond decimals, as the format wants.
    const int64_t ts_ns = wall0_us_ * 1000 + e.ts_ns;
    fmt::print(f,
               ",\n{{\"name\":\"{}\",\"cat\":\"{}\",\"ph\":\"X\",\"ts\":{}.{:03},\"dur\":{}.{:03},"
               "\"pid\":{},\"tid\":{},\"args\":{{{}}}}}",
               e.name, e.category, ts_ns / 1000, ts_ns % 1000, e.dur_ns / 1000, e.dur_ns % 1000,
               pid_, e.tid, args);
  }
  fmt::print(f, "\n]}}\n");
  bool ok = std::fflush(f) == 0;
  ok = std::fclose(f) == 0 && ok;
  if (!ok) return Status::IOError(fmt::format("writing the timeline '{}' failed", path_));
  spdlog::info("timeline: {} spans of {} in {}{}", events_.size(), process_, path_,
               dropped_ ? fmt::format(" ({} dropped past {})", dropped_, max_spans_) : "");
  return Status::OK();
}

Status MergeTimelines(const std::vector<std::string>& parts, const std::string& out) {
  nlohmann::json merged = {{"displayTimeUnit", "ns"}, {"traceEvents", nlohmann::json::array()}};
  uint64_t dropped = 0;
  for (const auto& p : parts) {
    std::ifstream in(p);
    if (!in) return Status::IOError(fmt::format("cannot read the timeline part '{}'", p));
    nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
    if (j.is_discarded() || !j.contains("traceEvents") || !j["traceEvents"].is_array())
      return Status::InvalidArgument(fmt::format("'{}' is not a Chrome trace", p));
    for (auto& e : j["traceEvents"]) merged["traceEvents"].push_back(std::move(e));
    if (j.contains("otherData") && j["otherData"].contains("dropped_spans"))
      dropped += j["otherData"]["dropped_spans"].get<uint64_t>();
  }
  merged["otherData"] = {{"dropped_spans", dropped}, {"parts", parts.size()}};
  std::ofstream o(out);
  if (!o) return Status::IOError(fmt::format("cannot write the timeline '{}'", out));
  o << merged.dump() << "\n";
  if (!o) return Status::IOError(fmt::format("writing the timeline '{}' failed", out));
  return Status::OK();
}

}  // namespace shardps::metrics
