// Runs a whole job inside one test process: a coordinator, S servers and W workers, all with
// their own contexts and threads (ShardPS keeps no global state, so they coexist).
#pragma once

#include <cstdlib>

#include <functional>
#include <future>
#include <memory>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "shardps/coordinator.h"
#include "shardps/server.h"
#include "shardps/worker.h"

namespace shardps::testing {

struct LocalCluster {
  std::unique_ptr<Coordinator> coordinator;
  std::vector<std::unique_ptr<Server>> servers;
  std::vector<std::unique_ptr<Worker>> workers;  // indexed by rank
  // Connects one more worker of rank `rank` (as Start did each): a restarted worker.
  std::function<Result<std::unique_ptr<Worker>>(uint32_t rank)> connect_worker;
  // Starts one more server with the job's options (rank -1: the coordinator's pick): a server
  // that joins the running job.
  std::function<Result<std::unique_ptr<Server>>(int32_t rank)> start_server;

  // `transport` names the job's transport; "X+nobatch" runs X with the workers' batches off
  // (fuse_bytes 0), so that small chunks take the landing-buffer path too.
  static std::unique_ptr<LocalCluster> Start(
      CoordinatorOptions co, uint32_t landing_buffers = 16, std::string transport = "tcp",
      uint32_t apply_threads = 1, std::function<void(ServerOptions&)> server_tweak = nullptr,
      std::function<void(WorkerOptions&)> worker_tweak = nullptr) {
    auto lc = std::make_unique<LocalCluster>();
    bool batches = true;
    if (auto plus = transport.find("+nobatch"); plus != std::string::npos) {
      transport.resize(plus);
      batches = false;
    }
    co.transport = transport;
    auto c = Coordinator::Start(co);
    EXPECT_TRUE(c.ok()) << c.status().ToString();
    if (!c.ok()) return nullptr;
    lc->coordinator = std::move(c).value();
    std::string addr = lc->coordinator->address();
    lc->start_server = [addr, landing_buffers, transport, apply_threads, server_tweak,
                        co](int32_t rank) {
      ServerOptions so;
      so.coordinator = addr;
      so.rank = rank;
      so.landing_buffers = landing_buffers;
      so.apply_threads = apply_threads;
      so.transport = transport;
      // rdma_cm binds the address of an RDMA interface, not loopback (scripts/test-rdma.sh).
      if (transport == "verbs" && std::getenv("SHARDPS_RDMA_ADDRESS"))
        so.listen = std::string(std::getenv("SHARDPS_RDMA_ADDRESS")) + ":0";
      so.register_timeout = std::chrono::milliseconds(20000);
      // What the job's options say of every node.
      so.secret_file = co.secret_file;
      so.metrics_listen = co.metrics_listen;
      so.tls_cert = co.tls_cert;
      so.tls_key = co.tls_key;
      so.tls_ca = co.tls_ca;
      if (server_tweak) server_tweak(so);
      return Server::Start(so);
    };
    std::vector<std::future<Result<std::unique_ptr<Server>>>> sf;
    for (uint32_t i = 0; i < co.num_servers; ++i)
      sf.push_back(std::async(std::launch::async, [start = lc->start_server, i] {
        return start(static_cast<int32_t>(i));
      }));
    lc->connect_worker = [addr, transport, co, batches, worker_tweak](uint32_t i) {
      WorkerOptions wo;
      if (!batches) wo.fuse_bytes = 0;
      wo.coordinator = addr;
      wo.rank = static_cast<int32_t>(i);
      wo.transport = transport;
      wo.register_timeout = std::chrono::milliseconds(20000);
      wo.rpc_timeout = std::chrono::milliseconds(20000);
      wo.secret_file = co.secret_file;
      wo.metrics_listen = co.metrics_listen;
      wo.tls_cert = co.tls_cert;
      wo.tls_key = co.tls_key;
      wo.tls_ca = co.tls_ca;
      if (worker_tweak) worker_tweak(wo);
      return Worker::Connect(wo);
    };
    std::vector<std::future<Result<std::unique_ptr<Worker>>>> wf;
    for (uint32_t i = 0; i < co.num_workers; ++i)
      wf.push_back(
          std::async(std::launch::async, [connect = lc->connect_worker, i] { return connect(i); }));
    bool ok = true;
    for (auto& f : sf) {
      auto s = f.get();
      EXPECT_TRUE(s.ok()) << s.status().ToString();
      if (s.ok())
        lc->servers.push_back(std::move(s).value());
      else
        ok = false;
    }
    for (auto& f : wf) {
      auto w = f.get();
      EXPECT_TRUE(w.ok()) << w.status().ToString();
      if (w.ok())
        lc->workers.push_back(std::move(w).value());
      else
        ok = false;
    }
    if (!ok) return nullptr;
    std::sort(lc->workers.begin(), lc->workers.end(),
              [](auto& a, auto& b) { return a->rank() < b->rank(); });
    return lc;
  }

  // Runs fn(worker) on one thread per worker and joins them.
  template <typename Fn>
  void ForEachWorker(Fn fn) {
    std::vector<std::thread> ts;
    for (auto& w : workers) ts.emplace_back([&fn, &w] { fn(*w); });
    for (auto& t : ts) t.join();
  }

  // Every worker says goodbye; the coordinator and servers then end cleanly.
  void Finish() {
    for (auto& w : workers) EXPECT_TRUE(w->Finish().ok());
    EXPECT_TRUE(coordinator->Wait(std::chrono::seconds(10)).ok());
    for (auto& s : servers) {
      if (!s) continue;  // one the test stopped
      EXPECT_TRUE(s->Wait(std::chrono::seconds(10)).ok());
    }
  }
};

}  // namespace shardps::testing
