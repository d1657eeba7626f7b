#include "cli.h"

#include <charconv>
#include <filesystem>

#include <fmt/format.h>
#include <spdlog/spdlog.h>

#include "transport/context.h"

namespace shardps::tools {

void JobFlags::Add(CLI::App* app, bool with_sizes) {
  using namespace tunables;
  if (with_sizes) {
    AddTunable(app, kServers, &servers)->check(CLI::Range(1u, 4096u));
    AddTunable(app, kWorkers, &workers)->check(CLI::Range(1u, 65536u));
  }
  AddTunable(app, kMode, &mode);  // sync, async, ssp:K: checked by ToCoordinator
  AddTunable(app, kAggregate, &aggregate)->check(CLI::IsMember({"mean", "sum"}));
  AddTunable(app, kSyncQuorum, &sync_quorum);
  AddTunable(app, kReplicas, &replicas)->check(CLI::Range(0u, 1u));
  AddTunable(app, kOnWorkerLoss, &on_worker_loss)->check(CLI::IsMember({"fail", "continue"}));
  AddTunable(app, kRestartWorkers, &restart_workers)->check(CLI::Range(0u, 1000000u));
  AddTunable(app, kRestartServers, &restart_servers)->check(CLI::Range(0u, 4000u));
  AddTunable(app, kWorkerWeights, &worker_weights);
  AddTunable(app, kWeightRule, &weight_rule)->check(CLI::IsMember({"fixed", "staleness"}));
  AddTunable(app, kTransport, &transport);
  AddTunable(app, kChunkSize, &chunk_size);
  AddTunable(app, kLandingBuffers, &landing_buffers)->check(CLI::Range(1u, 4096u));
  AddTunable(app, kApplyThreads, &apply_threads)->check(CLI::Range(1u, 64u));
  AddTunable(app, kDevice, &device);
  AddTunable(app, kRestore, &restore);
  AddTunable(app, kCheckpointIntervalS, &checkpoint_interval_s)
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 30));
  AddTunable(app, kCheckpointDir, &checkpoint_dir);
  AddTunable(app, kBusyPollUs, &busy_poll_us)->check(CLI::Range(int64_t{0}, int64_t{1000000}));
  AddTunable(app, kRegisterTimeoutMs, &register_timeout_ms)->check(CLI::PositiveNumber);
  AddTunable(app, kHeartbeatIntervalMs, &heartbeat_interval_ms)->check(CLI::PositiveNumber);
  AddTunable(app, kHeartbeatTimeoutMs, &heartbeat_timeout_ms)->check(CLI::PositiveNumber);
  AddTunable(app, kFailoverTimeoutMs, &failover_timeout_ms)->check(CLI::PositiveNumber);
  AddTunable(app, kConnectionInbound, &connection_inbound);
  AddTunable(app, kProcessInbound, &process_inbound);
  AddTunable(app, kFuseBytes, &fuse_bytes);
  AddTunable(app, kFuseUs, &fuse_us)->check(CLI::Range(int64_t{0}, int64_t{1000000}));
  if (with_sizes) AddTunable(app, kWorkersPerNode, &workers_per_node)->check(CLI::Range(1u, 1024u));
  AddTunable(app, kNodeReducer, &node_reducer)->check(CLI::IsMember({"auto", "shm", "nccl"}));
  AddTunable(app, kSecretFile, &secret_file);
  AddTunable(app, kMetricsListen, &metrics_listen);
  AddTunable(app, kTimeline, &timeline);
  AddTunable(app, kTlsCert, &tls_cert);
  AddTunable(app, kTlsKey, &tls_key);
  AddTunable(app, kTlsCa, &tls_ca);
}

Status JobFlags::InboundBytes(uint64_t* per_connection, uint64_t* per_process) const {
  auto c = ParseBytes(connection_inbound);
  if (!c.ok()) return c.status().WithContext("--connection-inbound-bytes");
  auto p = ParseBytes(process_inbound);
  if (!p.ok()) return p.status().WithContext("--process-inbound-bytes");
  *per_connection = *c;
  *per_process = *p;
  return Status::OK();
}

Result<CoordinatorOptions> JobFlags::ToCoordinator() const {
  CoordinatorOptions co;
  co.num_servers = servers;
  co.num_workers = workers;
  auto m = ParseMode(mode, &co.staleness);
  if (!m.ok()) return m.status().WithContext("--mode");
  co.mode = *m;
  co.sync_quorum = sync_quorum;
  co.replicas = replicas;
  co.continue_on_worker_loss = on_worker_loss == "continue";
  auto weights = ParseWeights(worker_weights);
  if (!weights.ok()) return weights.status().WithContext("--worker-weights");
  co.worker_weights = *weights;
  auto rule = ParseWeightRule(weight_rule);
  if (!rule.ok()) return rule.status().WithContext("--weight-rule");
  co.weight_rule = *rule;
  SHARDPS_ASSIGN_OR_RETURN(co.aggregate, ParseAggregate(aggregate));
  co.transport = transport;
  auto cb = ParseBytes(chunk_size);
  if (!cb.ok()) return cb.status().WithContext("--chunk-size");
  co.chunk_bytes = *cb;
  co.register_timeout = std::chrono::milliseconds(register_timeout_ms);
  co.heartbeat_interval = std::chrono::milliseconds(heartbeat_interval_ms);
  co.heartbeat_timeout = std::chrono::milliseconds(heartbeat_timeout_ms);
  co.failover_timeout = std::chrono::milliseconds(failover_timeout_ms);
  co.checkpoint_interval = std::chrono::seconds(checkpoint_interval_s);
  co.checkpoint_dir = checkpoint_dir;
  if (!co.checkpoint_dir.empty())
    co.checkpoint_dir = std::filesystem::absolute(co.checkpoint_dir).lexically_normal().string();
  co.secret_file = secret_file;
  co.metrics_listen = metrics_listen;
  co.tls_cert = tls_cert;
  co.tls_key = tls_key;
  co.tls_ca = tls_ca;
  if (!metrics_listen.empty()) {
    std::string host;
    uint16_t port = 0;
    if (Status st = transport::ParseHostPort(metrics_listen, &host, &port); !st.ok())
      return st.WithContext("--metrics-listen");
  }
  if (Status v = co.Validate(); !v.ok()) return v.WithContext("job flags");
  return co;
}

Result<uint64_t> ParseBytes(const std::string& s) {
  uint64_t v = 0;
  auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
  if (ec != std::errc() || p == s.data())
    return Status::InvalidArgument(fmt::format("'{}' is not a size (e.g. 4096, 64KiB, 4MiB)", s));
  std::string unit(p, s.data() + s.size());
  uint64_t mul = 0;
  if (unit.empty() || unit == "B") mul = 1;
  if (unit == "KiB" || unit == "K" || unit == "KB" || unit == "k") mul = 1ull << 10;
  if (unit == "MiB" || unit == "M" || unit == "MB") mul = 1ull << 20;
  if (unit == "GiB" || unit == "G" || unit == "GB") mul = 1ull << 30;
  if (mul == 0)
    return Status::InvalidArgument(
        fmt::format("'{}' has an unknown unit '{}' (B, KiB, MiB, GiB)", s, unit));
  if (v > (1ull << 40) / mul) return Status::InvalidArgument(fmt::format("'{}' is too large", s));
  return v * mul;
}

void ParseLayered(CLI::App& app, int argc, char** argv) {
  std::vector<std::string> args(argv + 1, argv + argc);
  // Pass 1: flags and environment, to learn the config file and the subcommand.
  app.parse(std::vector<std::string>(args.rbegin(), args.rend()));
  auto* cfg_opt = app.get_option("--config");
  std::string path = cfg_opt->count() ? cfg_opt->as<std::string>() : std::string();
  if (path.empty()) return;
  std::vector<CLI::ConfigItem> items;
  try {
    items = CLI::ConfigTOML().from_file(path);
  } catch (const CLI::FileError& e) {
    throw CLI::ValidationError("--config", e.what());
  }
  std::vector<std::string> extra_global, extra_sub;
  CLI::App* sub = app.get_subcommands().empty() ? nullptr : app.get_subcommands().front();
  for (const auto& it : items) {
    if (it.name == "++" || it.name == "--") continue;  // section markers
    CLI::App* target = &app;
    if (!it.parents.empty()) {
      if (it.parents.size() != 1)
        throw CLI::ValidationError("--config", path + ": unknown section '" + it.fullname() + "'");
      target = nullptr;
      for (auto* s : app.get_subcommands({}))
        if (s->get_name() == it.parents[0]) target = s;
      if (target == nullptr)
        throw CLI::ValidationError("--config", path + ": unknown section [" + it.parents[0] + "]");
    }
    CLI::Option* opt = nullptr;
    try {
      opt = target->get_option("--" + it.name);
    } catch (const CLI::OptionNotFound&) {
      throw CLI::ValidationError("--config", path + ": unknown key '" + it.fullname() + "'");
    }
    if (opt->count() > 0) continue;                 // a flag or a SHARDPS_* variable already set it
    if (target != &app && target != sub) continue;  // another subcommand's section
    auto& dst = target == &app ? extra_global : extra_sub;
    for (const auto& v : it.inputs) dst.push_back("--" + it.name + "=" + v);
  }
  // Pass 2: the file's values for what flags and environment left unset.
  std::vector<std::string> merged;
  for (const auto& a : args) {
    merged.push_back(a);
    if (sub && a == sub->get_name()) {
      merged.insert(merged.end(), extra_sub.begin(), extra_sub.end());
    }
  }
  merged.insert(merged.begin(), extra_global.begin(), extra_global.end());
  app.clear();
  app.parse(std::vector<std::string>(merged.rbegin(), merged.rend()));
}

void LogEffectiveConfig(const CLI::App& app) {
  std::string cfg = app.config_to_str(true, false);
  std::string line;
  for (char c : cfg) {
    if (c == '\n') {
      if (!line.empty()) spdlog::info("config: {}", line);
      line.clear();
    } else {
      line += c;
    }
  }
}

}  // namespace shardps::tools
