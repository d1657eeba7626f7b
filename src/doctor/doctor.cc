#include "doctor/doctor.h"

#include <dlfcn.h>
#include <net/if.h>
#include <sys/resource.h>

#include <algorithm>
#include <sstream>

#include <fmt/format.h>

#ifdef SHARDPS_HAVE_VERBS
#include <infiniband/verbs.h>
#endif
#ifdef SHARDPS_HAVE_UCX
#include "transport/ucx/context_impl.h"
#endif

namespace shardps::doctor {
namespace {

std::string Bytes(uint64_t b) {
  if (b == UINT64_MAX) return "unlimited";
  if (b >= (1ull << 30)) return fmt::format("{:.1f} GiB", static_cast<double>(b) / (1ull << 30));
  if (b >= (1ull << 20)) return fmt::format("{:.1f} MiB", static_cast<double>(b) / (1ull << 20));
  return fmt::format("{} KiB", b / 1024);
}

}  // namespace

const char* LevelName(Finding::Level l) {
  switch (l) {
    case Finding::Level::kOk:
      return "ok";
    case Finding::Level::kInfo:
      return "info";
    case Finding::Level::kWarning:
      return "warning";
    case Finding::Level::kError:
      return "error";
  }
  return "?";
}

namespace {

#ifdef SHARDPS_HAVE_VERBS
std::string PortState(ibv_port_state s) {
  switch (s) {
    case IBV_PORT_ACTIVE:
      return "ACTIVE";
    case IBV_PORT_DOWN:
      return "DOWN";
    case IBV_PORT_INIT:
      return "INIT";
    case IBV_PORT_ARMED:
      return "ARMED";
    case IBV_PORT_ACTIVE_DEFER:
      return "ACTIVE_DEFER";
    default:
      return "UNKNOWN";
  }
}

void GatherVerbs(Facts* f) {
  f->verbs_built = true;
#ifdef SHARDPS_HAVE_VERBS_TRANSPORT
  f->verbs_transport = true;
#endif
  int n = 0;
  ibv_device** list = ibv_get_device_list(&n);
  if (list == nullptr) {
    f->verbs_error = fmt::format("ibv_get_device_list failed: {}", std::strerror(errno));
    return;
  }
  for (int i = 0; i < n; ++i) {
    DeviceFacts d;
    d.name = ibv_get_device_name(list[i]);
    ibv_context* ctx = ibv_open_device(list[i]);
    if (ctx) {
      ibv_device_attr attr{};
      if (ibv_query_device(ctx, &attr) == 0) {
        // rdma_rxe and siw report the vendor id 0xffffff; their names say so too.
        d.software = attr.vendor_id == 0xffffff || d.name.rfind("rxe", 0) == 0 ||
                     d.name.rfind("siw", 0) == 0;
        for (int p = 1; p <= attr.phys_port_cnt; ++p) {
          ibv_port_attr pa{};
          if (ibv_query_port(ctx, static_cast<uint8_t>(p), &pa) != 0) continue;
          PortFacts pf;
          pf.number = p;
          pf.state = PortState(pa.state);
          pf.link_layer = pa.link_layer == IBV_LINK_LAYER_ETHERNET ? "Ethernet" : "InfiniBand";
          pf.active_mtu = 128 << static_cast<int>(pa.active_mtu);
          for (int g = 0; g < pa.gid_tbl_len && g < 16; ++g) {
            ibv_gid_entry e{};
            if (ibv_query_gid_ex(ctx, static_cast<uint32_t>(p), static_cast<uint32_t>(g), &e, 0) !=
                0)
              continue;
            const uint8_t* raw = e.gid.raw;
            if (std::all_of(raw, raw + 16, [](uint8_t x) { return x == 0; })) continue;
            std::string s;
            for (int k = 0; k < 16; k += 2)
              s += fmt::format("{}{:02x}{:02x}", k ? ":" : "", raw[k], raw[k + 1]);
            pf.gids.push_back(s);
            pf.gid_types.push_back(e.gid_type == IBV_GID_TYPE_ROCE_V2   ? "RoCE v2"
                                   : e.gid_type == IBV_GID_TYPE_ROCE_V1 ? "RoCE v1"
                                                                        : "IB");
            char ifname[IF_NAMESIZE] = {0};
            if (e.ndev_ifindex && pf.netdev.empty() && if_indextoname(e.ndev_ifindex, ifname))
              pf.netdev = ifname;
            // An IPv4-mapped RoCE v2 GID (::ffff:a.b.c.d) is the interface's IPv4 address.
            bool mapped = std::all_of(raw, raw + 10, [](uint8_t x) { return x == 0; }) &&
                          raw[10] == 0xff && raw[11] == 0xff;
            if (mapped && e.gid_type == IBV_GID_TYPE_ROCE_V2 && pf.ipv4.empty())
              pf.ipv4 = fmt::format("{}.{}.{}.{}", raw[12], raw[13], raw[14], raw[15]);
          }
          d.ports.push_back(pf);
        }
      }
      ibv_close_device(ctx);
    }
    f->devices.push_back(std::move(d));
  }
  ibv_free_device_list(list);
}
#endif

void GatherCuda(Facts* f) {
  void* h = dlopen("libcuda.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!h) {
    f->cuda_error = "no CUDA driver (libcuda.so.1 not found)";
    return;
  }
  using InitFn = int (*)(unsigned);
  using CountFn = int (*)(int*);
  auto init = reinterpret_cast<InitFn>(dlsym(h, "cuInit"));
  auto count = reinterpret_cast<CountFn>(dlsym(h, "cuDeviceGetCount"));
  int n = 0;
  if (!init || !count) {
    f->cuda_error = "libcuda.so.1 lacks cuInit/cuDeviceGetCount";
  } else if (int rc = init(0); rc != 0) {
    f->cuda_error = fmt::format("cuInit failed with CUDA error {} (no usable GPU?)", rc);
    f->cuda_devices = 0;
  } else if (count(&n) == 0) {
    f->cuda_devices = n;
  }
  dlclose(h);
}

void GatherNccl(Facts* f) {
  void* h = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
  if (!h) h = dlopen("/usr/local/cuda/lib64/libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
  if (!h) return;
  using VersionFn = int (*)(int*);
  auto version = reinterpret_cast<VersionFn>(dlsym(h, "ncclGetVersion"));
  int v = 0;
  if (version && version(&v) == 0)
    f->nccl_version = fmt::format("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100);
  dlclose(h);
}

}  // namespace

Facts Gather(const Options& options) {
  Facts f;
#ifdef SHARDPS_KERNEL_ARCHS
  f.gpu_kernels = SHARDPS_KERNEL_ARCHS;
#endif
  f.shard_bytes = options.shard_bytes;
#ifdef SHARDPS_HAVE_VERBS
  GatherVerbs(&f);
#endif
  rlimit rl{};
  if (getrlimit(RLIMIT_MEMLOCK, &rl) == 0) {
    f.memlock_soft = rl.rlim_cur == RLIM_INFINITY ? UINT64_MAX : rl.rlim_cur;
    f.memlock_hard = rl.rlim_max == RLIM_INFINITY ? UINT64_MAX : rl.rlim_max;
  }
#ifdef SHARDPS_HAVE_UCX
  f.ucx_built = true;
  transport::ContextOptions co;
  if (!options.ucx_tls.empty()) co.backend_settings = {{"UCX_TLS", options.ucx_tls}};
  auto info = transport::ucx::QueryUcx(co);
  f.ucx_version = info.version;
  f.ucx_error = info.error;
  f.ucx_cuda_memory = info.cuda_memory;
  std::istringstream lines(info.transports);
  std::string line;
  while (std::getline(lines, line)) {
    // "#   md 1  dev 2  flags -- tcp/eth0": keep the transport/device names.
    if (line.find(" dev ") == std::string::npos) continue;
    auto pos = line.find_last_of(' ');
    if (pos == std::string::npos || pos + 1 >= line.size()) continue;
    f.ucx_resources.push_back(line.substr(pos + 1));
  }
#endif
  GatherCuda(&f);
  GatherNccl(&f);
  return f;
}

std::string DataPath(const Facts& f) {
  bool rdma = false;
  for (const auto& d : f.devices)
    for (const auto& p : d.ports)
      if (p.state == "ACTIVE") rdma = true;
  if (rdma && f.verbs_transport && (!f.ucx_built || !f.ucx_error.empty()))
    return "verbs over RDMA (--transport verbs) between hosts; tcp otherwise";
  if (!f.ucx_built || !f.ucx_error.empty())
    return "tcp (the ucx transport is not available in this build or here)";
  if (rdma && f.verbs_transport)
    return "ucx over RDMA (rc/dc on the active InfiniBand/RoCE ports) between hosts, shared "
           "memory within a host; or verbs (--transport verbs) over RDMA";
  if (rdma)
    return "ucx over RDMA (rc/dc on the active InfiniBand/RoCE ports) between hosts, shared "
           "memory within a host";
  return "ucx over shared memory within a host and TCP between hosts (no active RDMA port); "
         "or the tcp transport";
}

std::vector<Finding> Advise(const Facts& f) {
  using L = Finding::Level;
  std::vector<Finding> out;
  // RDMA devices and ports.
  if (!f.verbs_built) {
    out.push_back({L::kWarning, "this build has no libibverbs support; RDMA devices are not listed",
                   "install libibverbs-dev (rdma-core) and rebuild"});
  } else if (!f.verbs_error.empty() || f.devices.empty()) {
    out.push_back(
        {L::kInfo,
         "no RDMA device found" + (f.verbs_error.empty() ? "" : " (" + f.verbs_error + ")"),
         "fine on one host (ucx uses shared memory) or without RDMA (use --transport tcp); on an "
         "InfiniBand/RoCE cluster, install the NIC's driver and rdma-core's ibverbs-providers, "
         "load the kernel modules (e.g. mlx5_ib) and check `ibv_devices`"});
  }
  bool any_active = false;
  for (const auto& d : f.devices) {
    if (d.ports.empty())
      out.push_back({L::kWarning, fmt::format("{}: no port could be queried", d.name),
                     "check the device with `ibv_devinfo -d " + d.name + "`"});
    for (const auto& p : d.ports) {
      std::string where = fmt::format("{} port {} ({})", d.name, p.number, p.link_layer);
      if (p.state != "ACTIVE") {
        out.push_back({L::kError, fmt::format("{} is {}", where, p.state),
                       "check the cable and the switch (`ibstat`); on InfiniBand a subnet "
                       "manager must run (opensm); or point UCX at an active port with "
                       "UCX_NET_DEVICES=<device>:<port>"});
        continue;
      }
      any_active = true;
      if (p.link_layer == "Ethernet" && p.gids.empty()) {
        out.push_back({L::kError, where + " is RoCE without any GID",
                       "give the port's network interface an IP address (RoCE v2 GIDs derive "
                       "from it) and check with `show_gids`; set UCX_IB_GID_INDEX if needed"});
      } else {
        out.push_back(
            {L::kOk,
             fmt::format("{} is ACTIVE, MTU {}, {} GID(s)", where, p.active_mtu, p.gids.size()),
             ""});
      }
      if (d.software) {
        out.push_back(
            {L::kInfo,
             fmt::format("{} is a software RDMA device{}: real verbs (queue pairs, "
                         "registration, one-sided semantics) at the speed of a CPU copy",
                         d.name, p.netdev.empty() ? "" : " over " + p.netdev),
             "good for tests; on a cluster use the NIC's own device (mlx5_*, bnxt_re_*, ...)"});
        if (f.ucx_built && f.ucx_error.empty())
          out.push_back({L::kInfo,
                         fmt::format("UCX 1.13's wire-up over ud_verbs drops {}'s packets (its "
                                     "destination-GID check)",
                                     d.name),
                         "for --transport ucx over it set UCX_UD_ETH_DGID_CHECK=n (or "
                         "UCX_TLS=rc_verbs,tcp,self, which wires up over tcp)"});
      } else if (p.link_layer == "Ethernet" && p.active_mtu < 4096 && p.active_mtu > 0) {
        out.push_back({L::kInfo, fmt::format("{} runs with MTU {}", where, p.active_mtu),
                       "a 4096-byte RoCE MTU (jumbo frames on the switch and interface) gives "
                       "better bandwidth"});
      }
      if (f.verbs_transport && p.link_layer == "Ethernet" && !p.ipv4.empty())
        out.push_back({L::kInfo,
                       fmt::format("{} is reached at {} (RoCE v2{})", where, p.ipv4,
                                   p.netdev.empty() ? "" : ", interface " + p.netdev),
                       fmt::format("for --transport verbs, servers listen on that address "
                                   "(SHARDPS_SERVER_LISTEN={}:0): rdma_cm cannot use loopback",
                                   p.ipv4)});
    }
  }
  // Locked memory: RDMA registration pins pages.
  if (f.memlock_soft != UINT64_MAX && f.memlock_soft < f.shard_bytes) {
    std::string what = fmt::format(
        "locked-memory limit (ulimit -l) is {}; registering a shard of {} with an RDMA device "
        "pins it and would fail with ENOMEM",
        Bytes(f.memlock_soft), Bytes(f.shard_bytes));
    std::string advice =
        "raise it: `ulimit -l unlimited` (hard limit " + Bytes(f.memlock_hard) +
        "), `* - memlock unlimited` in /etc/security/limits.conf, LimitMEMLOCK=infinity for "
        "systemd services, --ulimit memlock=-1 for containers; Slurm: PropagateResourceLimits";
    out.push_back({any_active ? L::kError : L::kInfo,
                   what + (any_active ? "" : " (no RDMA port here, so it does not matter now)"),
                   advice});
  } else {
    out.push_back({L::kOk,
                   fmt::format("locked-memory limit {} covers a shard of {}", Bytes(f.memlock_soft),
                               Bytes(f.shard_bytes)),
                   ""});
  }
  // UCX.
  if (!f.ucx_built) {
    out.push_back({L::kWarning, "this build has no ucx transport",
                   "install libucx-dev and rebuild (scripts/setup.sh does)"});
  } else if (!f.ucx_error.empty()) {
    out.push_back({L::kError, "UCX " + f.ucx_version + " cannot start: " + f.ucx_error,
                   "check UCX_TLS / UCX_NET_DEVICES and `ucx_info -d`"});
  } else {
    out.push_back(
        {L::kOk, fmt::format("UCX {}: {}", f.ucx_version, fmt::join(f.ucx_resources, ", ")), ""});
  }
  out.push_back({L::kInfo, "data path: " + DataPath(f), ""});
  // GPU.
  if (f.ucx_built && f.ucx_error.empty()) {
    if (f.ucx_cuda_memory) {
      out.push_back({L::kOk,
                     "UCX can register CUDA memory: GPU shards are registered directly "
                     "(GPUDirect RDMA)",
                     ""});
    } else {
      out.push_back({L::kInfo,
                     "UCX reports no CUDA memory support: GPU shards are staged through "
                     "registered host memory",
                     "for GPUDirect RDMA use a UCX built with CUDA (--with-cuda) and the "
                     "nvidia-peermem kernel module"});
    }
  }
  if (f.cuda_devices > 0) {
    out.push_back({L::kOk, fmt::format("{} CUDA device(s)", f.cuda_devices), ""});
  } else {
    out.push_back(
        {L::kInfo, "no CUDA device" + (f.cuda_error.empty() ? "" : ": " + f.cuda_error), ""});
  }
  out.push_back(
      {L::kInfo, f.nccl_version.empty() ? "no NCCL library found" : "NCCL " + f.nccl_version, ""});
  if (f.gpu_kernels.empty()) {
    out.push_back({L::kInfo, "this build has no CUDA kernels: `server --device cuda` is refused",
                   "build with the CUDA toolkit (nvcc) present, or -DSHARDPS_CUDA=ON"});
  } else if (f.cuda_devices > 0) {
    out.push_back({L::kOk,
                   fmt::format("GPU servers (--device cuda): kernels for sm {}, and PTX for newer "
                               "GPUs",
                               f.gpu_kernels),
                   ""});
  } else {
    out.push_back({L::kInfo,
                   fmt::format("this build has kernels for sm {} (server --device cuda), but no "
                               "GPU is usable here",
                               f.gpu_kernels),
                   ""});
  }
  return out;
}

std::string ToText(const Facts& f, const std::vector<Finding>& findings) {
  std::string s = "ShardPS doctor\n\nRDMA devices:\n";
  if (f.devices.empty()) s += "  none\n";
  for (const auto& d : f.devices) {
    s += "  " + d.name + "\n";
    for (const auto& p : d.ports)
      s += fmt::format("    port {}: {}, {}, MTU {}, GIDs: {}\n", p.number, p.state, p.link_layer,
                       p.active_mtu,
                       p.gids.empty() ? "none" : fmt::format("{}", fmt::join(p.gids, " ")));
  }
  s += fmt::format("Locked memory: soft {}, hard {}\n", Bytes(f.memlock_soft),
                   Bytes(f.memlock_hard));
  s += "UCX: " + (f.ucx_built ? f.ucx_version : std::string("not built")) + "\n";
  if (!f.ucx_resources.empty())
    s += fmt::format("  transports: {}\n", fmt::join(f.ucx_resources, ", "));
  s += "CUDA devices: " +
       (f.cuda_devices >= 0 ? std::to_string(f.cuda_devices) : std::string("none")) + "\n";
  s += "NCCL: " + (f.nccl_version.empty() ? std::string("none") : f.nccl_version) +
       "\n\nFindings:\n";
  for (const auto& x : findings) {
    s += fmt::format("  [{}] {}\n", LevelName(x.level), x.what);
    if (!x.advice.empty()) s += "      -> " + x.advice + "\n";
  }
  return s;
}

nlohmann::json ToJson(const Facts& f, const std::vector<Finding>& findings) {
  nlohmann::json devs = nlohmann::json::array();
  for (const auto& d : f.devices) {
    nlohmann::json ports = nlohmann::json::array();
    for (const auto& p : d.ports)
      ports.push_back({{"port", p.number},
                       {"state", p.state},
                       {"link_layer", p.link_layer},
                       {"active_mtu", p.active_mtu},
                       {"gids", p.gids},
                       {"gid_types", p.gid_types},
                       {"netdev", p.netdev},
                       {"ipv4", p.ipv4}});
    devs.push_back({{"name", d.name}, {"software", d.software}, {"ports", ports}});
  }
  nlohmann::json fs = nlohmann::json::array();
  for (const auto& x : findings)
    fs.push_back({{"level", LevelName(x.level)}, {"what", x.what}, {"advice", x.advice}});
  auto lim = [](uint64_t v) {
    return v == UINT64_MAX ? nlohmann::json("unlimited") : nlohmann::json(v);
  };
  return {{"rdma_devices", devs},
          {"verbs_built", f.verbs_built},
          {"verbs_error", f.verbs_error},
          {"verbs_transport", f.verbs_transport},
          {"memlock", {{"soft", lim(f.memlock_soft)}, {"hard", lim(f.memlock_hard)}}},
          {"shard_bytes", f.shard_bytes},
          {"ucx",
           {{"built", f.ucx_built},
            {"version", f.ucx_version},
            {"error", f.ucx_error},
            {"resources", f.ucx_resources},
            {"cuda_memory", f.ucx_cuda_memory}}},
          {"data_path", DataPath(f)},
          {"cuda_devices", f.cuda_devices},
          {"cuda_error", f.cuda_error},
          {"nccl_version", f.nccl_version},
          {"gpu_kernels", f.gpu_kernels},
          {"findings", fs}};
}

bool FactsFromJson(const nlohmann::json& doc, Facts* f) {
  try {
    Facts out;
    for (const auto& d : doc.at("rdma_devices")) {
      DeviceFacts df;
      df.name = d.at("name").get<std::string>();
      df.software = d.value("software", false);
      for (const auto& p : d.at("ports")) {
        PortFacts pf;
        pf.number = p.at("port").get<int>();
        pf.state = p.at("state").get<std::string>();
        pf.link_layer = p.at("link_layer").get<std::string>();
        pf.active_mtu = p.at("active_mtu").get<int>();
        pf.gids = p.at("gids").get<std::vector<std::string>>();
        pf.gid_types = p.value("gid_types", std::vector<std::string>{});
        pf.netdev = p.value("netdev", "");
        pf.ipv4 = p.value("ipv4", "");
        df.ports.push_back(std::move(pf));
      }
      out.devices.push_back(std::move(df));
    }
    out.verbs_built = doc.value("verbs_built", true);
    out.verbs_error = doc.at("verbs_error").get<std::string>();
    out.verbs_transport = doc.value("verbs_transport", false);
    auto lim = [](const nlohmann::json& v) {
      return v.is_string() ? UINT64_MAX : v.get<uint64_t>();
    };
    out.memlock_soft = lim(doc.at("memlock").at("soft"));
    out.memlock_hard = lim(doc.at("memlock").at("hard"));
    out.shard_bytes = doc.at("shard_bytes").get<uint64_t>();
    const auto& u = doc.at("ucx");
    out.ucx_built = u.at("built").get<bool>();
    out.ucx_version = u.at("version").get<std::string>();
    out.ucx_error = u.at("error").get<std::string>();
    out.ucx_resources = u.at("resources").get<std::vector<std::string>>();
    out.ucx_cuda_memory = u.at("cuda_memory").get<bool>();
    out.cuda_devices = doc.at("cuda_devices").get<int>();
    out.cuda_error = doc.value("cuda_error", "");
    out.nccl_version = doc.at("nccl_version").get<std::string>();
    out.gpu_kernels = doc.at("gpu_kernels").get<std::string>();
    *f = std::move(out);
    return true;
  } catch (const nlohmann::json::exception&) {
    return false;
  }
}

}  // namespace shardps::doctor
