// The doctor's advice on synthetic machines, and one real run on this one.
#include <fstream>

#include <gtest/gtest.h>

#include "doctor/doctor.h"

namespace shardps::doctor {
namespace {

using L = Finding::Level;

const Finding* Find(const std::vector<Finding>& fs, const std::string& needle) {
  for (const auto& f : fs)
    if (f.what.find(needle) != std::string::npos) return &f;
  return nullptr;
}

Facts Healthy() {
  Facts f;
  f.verbs_built = true;
  f.devices = {{"mlx5_0", {{1, "ACTIVE", "InfiniBand", 4096, {"fe80:0000:0000:0000:0001"}}}}};
  f.memlock_soft = f.memlock_hard = UINT64_MAX;
  f.shard_bytes = 64 << 20;
  f.ucx_built = true;
  f.ucx_version = "1.13.1";
  f.ucx_resources = {"md 0 : mlx5_0/ib"};
  return f;
}

TEST(DoctorAdvice, HealthyInfiniBandHasNoError) {
  auto fs = Advise(Healthy());
  for (const auto& f : fs) EXPECT_NE(f.level, L::kError) << f.what;
  ASSERT_TRUE(Find(fs, "mlx5_0 port 1"));
  EXPECT_EQ(Find(fs, "mlx5_0 port 1")->level, L::kOk);
  EXPECT_NE(DataPath(Healthy()).find("RDMA"), std::string::npos);
}

TEST(DoctorAdvice, PortDownIsAnErrorWithAdvice) {
  Facts f = Healthy();
  f.devices[0].ports[0].state = "DOWN";
  auto fs = Advise(f);
  const Finding* x = Find(fs, "mlx5_0 port 1 (InfiniBand) is DOWN");
  ASSERT_TRUE(x);
  EXPECT_EQ(x->level, L::kError);
  EXPECT_NE(x->advice.find("subnet manager"), std::string::npos);
  EXPECT_NE(x->advice.find("UCX_NET_DEVICES"), std::string::npos);
}

TEST(DoctorAdvice, RoceWithoutGidIsAnError) {
  Facts f = Healthy();
  f.devices[0].ports[0].link_layer = "Ethernet";
  f.devices[0].ports[0].gids.clear();
  auto fs = Advise(f);
  const Finding* x = Find(fs, "RoCE without any GID");
  ASSERT_TRUE(x);
  EXPECT_EQ(x->level, L::kError);
  EXPECT_NE(x->advice.find("IP address"), std::string::npos);
}

TEST(DoctorAdvice, LowMemlockFailsRegistrationOnlyWhereRdmaIsUsed) {
  Facts f = Healthy();
  f.memlock_soft = 64 << 10;
  f.memlock_hard = 64 << 10;
  auto fs = Advise(f);
  const Finding* x = Find(fs, "locked-memory limit");
  ASSERT_TRUE(x);
  EXPECT_EQ(x->level, L::kError);
  EXPECT_NE(x->what.find("ENOMEM"), std::string::npos);
  EXPECT_NE(x->advice.find("limits.conf"), std::string::npos);
  f.devices.clear();  // no RDMA: the limit does not matter
  x = Find(Advise(f), "locked-memory limit");
  ASSERT_TRUE(x);
  EXPECT_EQ(x->level, L::kInfo);
}

TEST(DoctorAdvice, NoDeviceIsSaidPlainly) {
  Facts f = Healthy();
  f.devices.clear();
  auto fs = Advise(f);
  const Finding* x = Find(fs, "no RDMA device found");
  ASSERT_TRUE(x);
  EXPECT_EQ(x->level, L::kInfo);
  EXPECT_NE(DataPath(f).find("shared memory"), std::string::npos);
}

TEST(DoctorAdvice, GpuMemoryRegistrationChoice) {
  Facts f = Healthy();
  f.ucx_cuda_memory = false;
  EXPECT_TRUE(Find(Advise(f), "staged through registered host memory"));
  f.ucx_cuda_memory = true;
  EXPECT_TRUE(Find(Advise(f), "GPUDirect RDMA"));
}

TEST(DoctorAdvice, SaysWhetherGpuServersCanRunHere) {
  auto f = Healthy();
  f.gpu_kernels = "";
  EXPECT_TRUE(Find(Advise(f), "this build has no CUDA kernels"));
  f.gpu_kernels = "80,90";
  f.cuda_devices = 0;
  EXPECT_TRUE(Find(Advise(f), "kernels for sm 80,90 (server --device cuda), but no GPU"));
  f.cuda_devices = 2;
  EXPECT_TRUE(Find(Advise(f), "GPU servers (--device cuda): kernels for sm 80,90"));
}

TEST(DoctorAdvice, JsonCarriesFactsAndFindings) {
  Facts f = Healthy();
  auto j = ToJson(f, Advise(f));
  EXPECT_EQ(j["rdma_devices"][0]["name"], "mlx5_0");
  EXPECT_EQ(j["rdma_devices"][0]["ports"][0]["state"], "ACTIVE");
  EXPECT_EQ(j["memlock"]["soft"], "unlimited");
  EXPECT_TRUE(j["findings"].is_array());
  EXPECT_FALSE(j["findings"].empty());
}

// `shardps doctor --json` as it ran in the soft-RoCE virtual machine (scripts/test-rdma.sh
// checks the guest's output against it, and rewrites it with --update-fixture): its facts read
// back give exactly its findings, and they are the right ones for a software RoCE device.
TEST(DoctorAdvice, SoftRoceFixture) {
  std::ifstream in(std::string(SHARDPS_SOURCE_DIR) + "/tests/doctor/fixtures/soft-roce.json");
  ASSERT_TRUE(in.good());
  auto doc = nlohmann::json::parse(in);
  Facts f;
  ASSERT_TRUE(FactsFromJson(doc, &f));
  ASSERT_EQ(f.devices.size(), 1u);
  EXPECT_EQ(f.devices[0].name, "rxe0");
  EXPECT_TRUE(f.devices[0].software);
  EXPECT_EQ(f.devices[0].ports[0].ipv4, "10.77.0.1");
  auto fs = Advise(f);
  ASSERT_EQ(fs.size(), doc["findings"].size());
  for (size_t i = 0; i < fs.size(); ++i) {
    EXPECT_EQ(LevelName(fs[i].level), doc["findings"][i]["level"].get<std::string>()) << i;
    EXPECT_EQ(fs[i].what, doc["findings"][i]["what"].get<std::string>()) << i;
    EXPECT_EQ(fs[i].advice, doc["findings"][i]["advice"].get<std::string>()) << i;
  }
  EXPECT_EQ(DataPath(f), doc["data_path"].get<std::string>());
  for (const auto& x : fs) EXPECT_NE(x.level, L::kError) << x.what;
  ASSERT_TRUE(Find(fs, "rxe0 is a software RDMA device over veth0"));
  ASSERT_TRUE(Find(fs, "is reached at 10.77.0.1"));
  EXPECT_NE(Find(fs, "is reached at 10.77.0.1")->advice.find("SHARDPS_SERVER_LISTEN=10.77.0.1:0"),
            std::string::npos);
  ASSERT_TRUE(Find(fs, "UCX 1.13's wire-up over ud_verbs"));
  EXPECT_NE(Find(fs, "UCX 1.13's wire-up")->advice.find("UCX_UD_ETH_DGID_CHECK=n"),
            std::string::npos);
  // A hardware RoCE port is not told it is software, and gets the MTU advice instead.
  Facts hw = f;
  hw.devices[0].software = false;
  hw.devices[0].name = "mlx5_0";
  auto hfs = Advise(hw);
  EXPECT_FALSE(Find(hfs, "software RDMA device"));
  EXPECT_TRUE(Find(hfs, "runs with MTU 1024"));
}

// This machine: whatever it has, gathering works and the report says something.
TEST(DoctorHere, GatherAndReportOnThisMachine) {
  Facts f = Gather(Options{});
  auto fs = Advise(f);
  EXPECT_FALSE(fs.empty());
  std::string text = ToText(f, fs);
  EXPECT_NE(text.find("RDMA devices"), std::string::npos);
  EXPECT_NE(text.find("Findings"), std::string::npos);
}

}  // namespace
}  // namespace shardps::doctor
