#include <fstream>
#include <random>
#include <set>
#include <sstream>

#include <gtest/gtest.h>

#include "cluster/messages.h"
#include "core/checksum.h"
#include "core/codec.h"
#include "core/environment.h"
#include "core/job_environment.h"
#include "shardps/coordinator.h"
#include "shardps/server.h"
#include "shardps/status.h"
#include "shardps/tunables.h"
#include "shardps/types.h"
#include "shardps/worker.h"
#include "transport/frame.h"

namespace shardps {
namespace {

TEST(Status, OkIsCheapAndErrorsCarryCodeAndMessage) {
  Status ok;
  EXPECT_TRUE(ok.ok());
  EXPECT_EQ(ok.ToString(), "OK");
  Status e = Status::Timeout("barrier 'x'");
  EXPECT_TRUE(e.IsTimeout());
  EXPECT_EQ(e.ToString(), "Timeout: barrier 'x'");
  EXPECT_EQ(e.WithContext("worker 1").message(), "worker 1: barrier 'x'");
  EXPECT_TRUE(Status::FromErrno("connect", ECONNREFUSED).IsUnavailable());
}

TEST(Result, HoldsValueOrError) {
  Result<int> a = 5;
  EXPECT_TRUE(a.ok());
  EXPECT_EQ(*a, 5);
  Result<int> b = Status::NotFound("k");
  EXPECT_FALSE(b.ok());
  EXPECT_TRUE(b.status().IsNotFound());
  Result<int> c = Status::OK();  // a bug: turned into an error, never a fake value
  EXPECT_FALSE(c.ok());
}

TEST(Codec, RoundTrip) {
  Bytes b;
  Writer w(&b);
  w.Put<uint32_t>(7);
  w.PutString("hello");
  std::vector<float> v = {1.5f, -2.0f};
  w.PutVector<float>(v);
  Reader r(b.data(), b.size());
  uint32_t x = 0;
  std::string s;
  std::vector<float> got;
  ASSERT_TRUE(r.Get(&x));
  ASSERT_TRUE(r.GetString(&s));
  ASSERT_TRUE(r.GetVector(&got, 10));
  EXPECT_TRUE(r.done());
  EXPECT_EQ(x, 7u);
  EXPECT_EQ(s, "hello");
  EXPECT_EQ(got, v);
}

TEST(Codec, LengthsPointingPastTheEndAreRefused) {
  Bytes b;
  Writer w(&b);
  w.Put<uint32_t>(1000);  // a string length with only 3 bytes behind it
  w.PutRaw("abc", 3);
  Reader r(b.data(), b.size());
  std::string s;
  EXPECT_FALSE(r.GetString(&s));
  EXPECT_TRUE(r.failed());
  Bytes c;
  Writer w2(&c);
  w2.Put<uint64_t>(~0ull);  // an absurd vector count
  Reader r2(c.data(), c.size());
  std::vector<float> v;
  EXPECT_FALSE(r2.GetVector(&v, 1 << 20));
}

// Random bytes fed to every message decoder: never a crash, only a clean refusal.
TEST(Codec, RandomInputNeverCrashesTheDecoders) {
  std::mt19937 rng(42);
  for (int i = 0; i < 20000; ++i) {
    Bytes b(rng() % 64);
    for (auto& x : b) x = static_cast<uint8_t>(rng());
    {
      Reader r(b.data(), b.size());
      cluster::ClusterView v;
      (void)v.Decode(&r);
    }
    {
      Reader r(b.data(), b.size());
      cluster::RegisterRequest q;
      (void)q.Decode(&r);
    }
    {
      Reader r(b.data(), b.size());
      cluster::CreateChunkItem c;
      (void)c.Decode(&r);
    }
    {
      Reader r(b.data(), b.size());
      cluster::ChunkSlots s;
      (void)s.Decode(&r);
    }
    {
      Reader r(b.data(), b.size());
      uint64_t id;
      Status st;
      (void)cluster::ParseReplyHead(&r, &id, &st);
    }
  }
}

// The register reply of a server that joins a running job: its fields travel, and a dead server
// the view does not have is refused.
TEST(Codec, AJoiningServersRegisterReplyRoundTrips) {
  cluster::RegisterReply rep;
  rep.node_id = 9;
  rep.rank = 3;
  rep.view.num_servers = 4;
  rep.view.num_workers = 2;
  for (uint32_t s = 0; s < 4; ++s)
    rep.view.servers.push_back({s + 1, "127.0.0.1:" + std::to_string(7000 + s)});
  rep.joined = true;
  rep.epoch = 2;
  rep.dead_servers = {0, 2};
  rep.removed_workers = {1};
  Bytes b;
  Writer w(&b);
  rep.Encode(&w);
  Reader r(b.data(), b.size());
  cluster::RegisterReply got;
  ASSERT_TRUE(got.Decode(&r));
  EXPECT_TRUE(r.done());
  EXPECT_TRUE(got.joined);
  EXPECT_FALSE(got.rejoined);
  EXPECT_EQ(got.epoch, 2u);
  EXPECT_EQ(got.dead_servers, (std::vector<uint32_t>{0, 2}));
  EXPECT_EQ(got.removed_workers, (std::vector<uint32_t>{1}));
  EXPECT_EQ(got.view.servers.size(), 4u);
  rep.dead_servers = {4};  // not in the view
  Bytes c;
  Writer w2(&c);
  rep.Encode(&w2);
  Reader r2(c.data(), c.size());
  EXPECT_FALSE(got.Decode(&r2));
  cluster::ServerJoined j{1, 3, 9, "127.0.0.1:7003"};
  Bytes d;
  Writer w3(&d);
  j.Encode(&w3);
  Reader r3(d.data(), d.size());
  cluster::ServerJoined jj;
  ASSERT_TRUE(jj.Decode(&r3));
  EXPECT_EQ(jj.rank, 3u);
  EXPECT_EQ(jj.address, "127.0.0.1:7003");
  j.rank = cluster::kMaxServers;  // beyond any job
  Bytes e;
  Writer w4(&e);
  j.Encode(&w4);
  Reader r4(e.data(), e.size());
  EXPECT_FALSE(jj.Decode(&r4));
}

TEST(Frame, HeaderValidation) {
  uint8_t buf[transport::kFrameHeaderSize];
  transport::FrameHeader h;
  h.type = transport::FrameType::kWriteReq;
  h.meta_len = 24;
  h.payload_len = 100;
  h.request_id = 9;
  h.EncodeTo(buf);
  transport::FrameHeader d;
  ASSERT_TRUE(d.DecodeFrom(buf, 1024, 1024).ok());
  EXPECT_EQ(d.request_id, 9u);
  EXPECT_EQ(d.payload_len, 100u);
  EXPECT_TRUE(d.DecodeFrom(buf, 1024, 99).IsProtocolError());  // payload over the limit
  EXPECT_TRUE(d.DecodeFrom(buf, 10, 1024).IsProtocolError());  // meta over the limit
  buf[0] ^= 1;
  EXPECT_TRUE(d.DecodeFrom(buf, 1024, 1024).IsProtocolError());  // magic
}

TEST(Types, ConsistencySettingsParseAndRefuseTypos) {
  uint32_t k = 99;
  EXPECT_EQ(ParseMode("ssp:3", &k).value(), Mode::kSsp);
  EXPECT_EQ(k, 3u);
  EXPECT_EQ(ModeString(Mode::kSsp, 3), "ssp:3");
  EXPECT_EQ(ParseMode("ssp:0", &k).value(), Mode::kSsp);
  EXPECT_EQ(k, 0u);
  EXPECT_EQ(ParseMode("async", &k).value(), Mode::kAsync);
  EXPECT_EQ(k, 0u);
  for (const char* bad : {"ssp", "ssp:", "ssp:-1", "ssp:2x", "ssp:1000001", "SSP:2"})
    EXPECT_NE(ParseMode(bad).status().message().find(bad), std::string::npos) << bad;
  EXPECT_EQ(ParseWeights("1,0.5,2").value(), (std::vector<float>{1.0f, 0.5f, 2.0f}));
  EXPECT_TRUE(ParseWeights("").value().empty());
  for (const char* bad : {"1,,2", "1,x", "-1", "nan", "inf", "1001", "1,"})
    EXPECT_FALSE(ParseWeights(bad).ok()) << bad;
  EXPECT_EQ(ParseWeightRule("staleness").value(), WeightRule::kStaleness);
  EXPECT_FALSE(ParseWeightRule("stale").ok());
  CoordinatorOptions co;
  co.num_workers = 3;
  co.sync_quorum = 4;
  EXPECT_NE(co.Validate().message().find("quorum 4"), std::string::npos);
  co.sync_quorum = 2;
  co.mode = Mode::kAsync;
  EXPECT_NE(co.Validate().message().find("sync mode only"), std::string::npos);
  co.mode = Mode::kSync;
  EXPECT_TRUE(co.Validate().ok());
  co.worker_weights = {1.0f, 1.0f};
  EXPECT_NE(co.Validate().message().find("2 worker weights for 3 workers"), std::string::npos);
  co.worker_weights = {1.0f, 1.0f, -1.0f};
  EXPECT_FALSE(co.Validate().ok());
}

TEST(Types, ParsersNameTheBadValue) {
  EXPECT_TRUE(ParseMode("sync").ok());
  EXPECT_NE(ParseMode("synk").status().message().find("synk"), std::string::npos);
  EXPECT_TRUE(ParseOptimizer("adam").ok());
  EXPECT_FALSE(ParseOptimizer("adamw").ok());
  EXPECT_FALSE(ParseAggregate("max").ok());
  OptimizerConfig o;
  o.beta1 = 1.0f;
  EXPECT_NE(o.Validate().message().find("beta1"), std::string::npos);
  TensorSpec t;
  t.shape = {3, -1};
  EXPECT_EQ(t.numel(), 0u);
  t.shape = {3, 4};
  EXPECT_EQ(t.numel(), 12u);
}

TEST(Checksum, DetectsAnyChangedByte) {
  std::vector<uint8_t> a(4096, 7);
  uint64_t h = Checksum(a.data(), a.size());
  for (size_t i : {size_t{0}, size_t{1000}, size_t{4095}}) {
    a[i] ^= 1;
    EXPECT_NE(Checksum(a.data(), a.size()), h);
    a[i] ^= 1;
  }
  EXPECT_EQ(Checksum(a.data(), a.size()), h);
}

// Regression (found by fuzz_messages): a vector of zero elements was memcpy'd from a null
// pointer (undefined behaviour, caught by UBSan).
TEST(Codec, GetVectorOfZeroElementsReadsNothing) {
  Bytes b;
  Writer w(&b);
  w.Put<uint64_t>(0);
  Reader r(b.data(), b.size());
  std::vector<float> v;
  ASSERT_TRUE(r.GetVector(&v, 16));
  EXPECT_TRUE(v.empty());
  EXPECT_TRUE(r.done());
}

// docs/configuration.md is the tunables table, exactly (regenerate it with
// `shardps tunables --markdown > docs/configuration.md`).
TEST(Tunables, TheConfigurationPageIsTheTable) {
  std::ifstream f(std::string(SHARDPS_SOURCE_DIR) + "/docs/configuration.md");
  ASSERT_TRUE(f) << "docs/configuration.md is missing";
  std::stringstream page;
  page << f.rdbuf();
  EXPECT_EQ(page.str(), TunablesMarkdown())
      << "docs/configuration.md is stale: shardps tunables --markdown > docs/configuration.md";
}

TEST(Tunables, EachVariableIsDeclaredOnceAndNamedShardps) {
  std::set<std::string_view> envs;
  for (const Tunable* t : tunables::kAll) {
    EXPECT_TRUE(envs.insert(t->env).second) << t->env << " declared twice";
    EXPECT_EQ(t->env.substr(0, 8), "SHARDPS_") << t->env;
    EXPECT_FALSE(t->help.empty()) << t->name;
  }
}

// The Options structs take their defaults from the table.
TEST(Tunables, OptionsDefaultsAreTheTables) {
  ServerOptions so;
  EXPECT_EQ(so.landing_buffers, tunables::kLandingBuffers.number);
  EXPECT_EQ(so.busy_poll.count(), tunables::kBusyPollUs.number);
  EXPECT_EQ(static_cast<int64_t>(so.connection_inbound_bytes), tunables::kConnectionInbound.number);
  WorkerOptions wo;
  EXPECT_EQ(wo.rpc_timeout.count(), tunables::kRpcTimeoutMs.number);
  CoordinatorOptions co;
  EXPECT_EQ(static_cast<int64_t>(co.chunk_bytes), tunables::kChunkSize.number);
  EXPECT_EQ(co.heartbeat_timeout.count(), tunables::kHeartbeatTimeoutMs.number);
  EXPECT_EQ(co.replicas, 1u);  // a backup of every chunk whenever the job has 2 servers or more
}

TEST(Environment, ReadsTheSnapshotNotTheProcess) {
  std::string a = "SHARDPS_RANK=3", b = "UCX_TLS=shm,self", c = "SHARDPS_RANKX=9", d = "NOEQ";
  char* envp[] = {a.data(), b.data(), c.data(), d.data(), nullptr};
  Environment env(envp);
  EXPECT_EQ(env.Get("SHARDPS_RANK"), "3");
  EXPECT_FALSE(env.Has("SHARDPS_RAN"));
  EXPECT_FALSE(env.Has("NOEQ"));
  auto ucx = env.WithPrefix("UCX_");
  ASSERT_EQ(ucx.size(), 1u);
  EXPECT_EQ(ucx[0].first, "UCX_TLS");
  EXPECT_EQ(ucx[0].second, "shm,self");
  auto wo = WorkerOptions::FromEnvironment(envp);
  EXPECT_FALSE(wo.ok());  // no coordinator
  std::string e = "SHARDPS_COORDINATOR=127.0.0.1:1", f = "SHARDPS_TIMEOUT_MS=12x";
  char* bad[] = {e.data(), f.data(), nullptr};
  wo = WorkerOptions::FromEnvironment(bad);
  ASSERT_FALSE(wo.ok());
  EXPECT_NE(wo.status().message().find("SHARDPS_TIMEOUT_MS"), std::string::npos);
  char* good[] = {e.data(), a.data(), b.data(), nullptr};
  wo = WorkerOptions::FromEnvironment(good);
  ASSERT_TRUE(wo.ok()) << wo.status().ToString();
  EXPECT_EQ(wo->rank, 3);
  EXPECT_EQ(wo->transport_settings.size(), 1u);
}

Environment Env(std::vector<std::string> entries) {
  std::vector<char*> p;
  for (auto& e : entries) p.push_back(e.data());
  p.push_back(nullptr);
  return Environment(p.data());
}

TEST(JobEnvironment, SlurmHostListsExpand) {
  EXPECT_EQ(ExpandSlurmHostList("node[01-03,07],login1").value(),
            (std::vector<std::string>{"node01", "node02", "node03", "node07", "login1"}));
  EXPECT_EQ(ExpandSlurmHostList("gpu-[9-11]-ib").value(),
            (std::vector<std::string>{"gpu-9-ib", "gpu-10-ib", "gpu-11-ib"}));
  EXPECT_EQ(ExpandSlurmHostList("127.0.0.1").value(), std::vector<std::string>{"127.0.0.1"});
  EXPECT_EQ(ExpandSlurmHostList("n[1-100000000]", 2).value(),
            (std::vector<std::string>{"n1", "n2"}));
  for (const char* bad : {"", "n[1-", "n[3-1]", "n[a]", "a,,b", "n[1-2"})
    EXPECT_FALSE(ExpandSlurmHostList(bad).ok()) << bad;
}

TEST(JobEnvironment, EachLauncherIsReadFromItsVariables) {
  auto t = DetectJobPlacement(Env(
      {"RANK=2", "WORLD_SIZE=4", "LOCAL_RANK=0", "LOCAL_WORLD_SIZE=2", "MASTER_ADDR=10.0.0.1"}));
  ASSERT_TRUE(t.ok()) << t.status().ToString();
  EXPECT_EQ(t->launcher, "torchrun");
  EXPECT_EQ(t->rank, 2);
  EXPECT_EQ(t->size, 4);
  EXPECT_EQ(t->local_size, 2);
  EXPECT_EQ(t->coordinator_host, "10.0.0.1");
  auto m = DetectJobPlacement(Env({"OMPI_COMM_WORLD_RANK=3", "OMPI_COMM_WORLD_SIZE=8",
                                   "OMPI_COMM_WORLD_LOCAL_RANK=1", "SLURM_PROCID=7"}));
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->launcher, "openmpi");  // the task's own ranks, even under srun
  EXPECT_EQ(m->rank, 3);
  EXPECT_EQ(m->local_rank, 1);
  EXPECT_TRUE(m->coordinator_host.empty());
  auto s = DetectJobPlacement(Env(
      {"SLURM_PROCID=5", "SLURM_NTASKS=8", "SLURM_LOCALID=1", "SLURM_JOB_NODELIST=gpu[03-04]"}));
  ASSERT_TRUE(s.ok());
  EXPECT_EQ(s->launcher, "slurm");
  EXPECT_EQ(s->rank, 5);
  EXPECT_EQ(s->coordinator_host, "gpu03");
  auto d = DetectJobPlacement(
      Env({"DMLC_ROLE=server", "DMLC_NUM_SERVER=2", "DMLC_NUM_WORKER=3",
           "DMLC_PS_ROOT_URI=10.0.0.2", "DMLC_PS_ROOT_PORT=9000", "RANK=1", "WORLD_SIZE=2"}));
  ASSERT_TRUE(d.ok());
  EXPECT_EQ(d->launcher, "dmlc");  // explicit roles first
  EXPECT_EQ(d->dmlc_role, "server");
  EXPECT_EQ(d->dmlc_servers, 2);
  EXPECT_EQ(d->coordinator_port, 9000);
  EXPECT_NE(d->Describe().find("role server"), std::string::npos);
}

TEST(JobEnvironment, MalformedOrMissingVariablesAreNamed) {
  EXPECT_TRUE(DetectJobPlacement(Env({"PATH=/bin"})).status().IsNotFound());
  auto e = DetectJobPlacement(Env({"RANK=x", "WORLD_SIZE=4"}));
  EXPECT_NE(e.status().message().find("RANK='x'"), std::string::npos) << e.status().ToString();
  e = DetectJobPlacement(Env({"RANK=4", "WORLD_SIZE=4"}));
  EXPECT_NE(e.status().message().find("not below"), std::string::npos);
  e = DetectJobPlacement(Env({"DMLC_ROLE=boss", "DMLC_NUM_SERVER=1", "DMLC_NUM_WORKER=1"}));
  EXPECT_NE(e.status().message().find("DMLC_ROLE='boss'"), std::string::npos);
  e = DetectJobPlacement(Env({"DMLC_ROLE=worker", "DMLC_NUM_SERVER=1", "DMLC_NUM_WORKER=1"}));
  EXPECT_NE(e.status().message().find("DMLC_PS_ROOT_URI"), std::string::npos);
  e = DetectJobPlacement(Env({"SLURM_PROCID=0", "SLURM_NTASKS=2", "SLURM_JOB_NODELIST=n[1-"}));
  EXPECT_NE(e.status().message().find("n[1-"), std::string::npos);
}

}  // namespace
}  // namespace shardps
