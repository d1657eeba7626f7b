#include "checkpoint.h"

#include <cstdio>
#include <filesystem>

#include "cli.h"
#include "cluster/messages.h"
#include "cluster/rpc.h"
#include "shardps/tunables.h"
#include "transport/context.h"

namespace shardps::tools {

void AddCheckpointFlags(CLI::App* app, CheckpointFlags* f) {
  using namespace tunables;
  AddTunable(app, kCoordinator, &f->coordinator)->required();
  app->add_option("dir", f->dir,
                  "the directory to write it into: one the servers and the coordinator share")
      ->required();
  app->add_option("--timeout-ms", f->timeout_ms,
                  "give up (and let the workers go on) after this long")
      ->check(CLI::Range(int64_t{1}, int64_t{86400000}));
  app->add_option("--connect-timeout-ms", f->connect_timeout_ms,
                  "how long to keep trying to reach the coordinator")
      ->check(CLI::Range(int64_t{1}, int64_t{3600000}));
  AddTunable(app, kSecretFile, &f->secret_file);
  AddTunable(app, kTlsCert, &f->tls_cert);
  AddTunable(app, kTlsKey, &f->tls_key);
  AddTunable(app, kTlsCa, &f->tls_ca);
}

Result<std::string> RequestCheckpoint(const CheckpointFlags& f) {
  using namespace cluster;
  transport::ContextOptions co;
  SHARDPS_RETURN_IF_ERROR(transport::SecureRole(f.secret_file, {f.tls_cert, f.tls_key, f.tls_ca},
                                                "checkpoint client", &co));
  co.name = "checkpoint";
  auto ctx = transport::CreateContext("tcp", co);
  if (!ctx.ok()) return ctx.status();
  auto slot = std::make_shared<std::shared_ptr<RpcChannel>>();
  transport::ConnectionHandlers h;
  h.on_message = [slot](const std::shared_ptr<transport::Connection>& c, transport::Message m) {
    if (m.tag != kReply || !*slot || !(*slot)->OnReply(m)) c->Close();
  };
  h.on_close = [slot](const std::shared_ptr<transport::Connection>&, Status st) {
    if (*slot)
      (*slot)->FailAll(Status::Unavailable("the coordinator closed the connection" +
                                           (st.ok() ? std::string() : ": " + st.message())));
  };
  auto conn = (*ctx)->Connect(f.coordinator, h, std::chrono::milliseconds(f.connect_timeout_ms));
  if (!conn.ok())
    return conn.status().WithContext("cannot reach the coordinator at " + f.coordinator);
  *slot = std::make_shared<RpcChannel>(*conn);
  Bytes body;
  Writer w(&body);
  TakeCheckpoint{std::filesystem::absolute(f.dir).lexically_normal().string(),
                 static_cast<uint32_t>(f.timeout_ms)}
      .Encode(&w);
  // The coordinator answers within the checkpoint's timeout; a little more for the way back.
  auto rep = CallSync(**slot, kTakeCheckpoint, body,
                      std::chrono::milliseconds(f.timeout_ms) + std::chrono::seconds(10),
                      "the checkpoint");
  // A coordinator that wants a secret closes the connection unanswered: the call fails as the
  // connection closed (Unavailable), or, when the close came first, as sent on a closed one.
  const bool closed_by_peer = (*conn)->closed();
  (*conn)->Close();
  if (!rep.ok() && f.secret_file.empty() &&
      (rep.status().code() == Status::Code::kUnavailable || closed_by_peer))
    return rep.status().WithContext(
        "a job with a cluster secret refuses clients without it (--secret FILE)");
  if (!rep.ok()) return rep.status();
  Reader r(rep->data(), rep->size());
  std::string about;
  if (!r.GetString(&about, 65536) || !r.done())
    return Status::ProtocolError("malformed checkpoint reply");
  return about;
}

int RunCheckpoint(const CheckpointFlags& f) {
  auto r = RequestCheckpoint(f);
  if (!r.ok()) {
    std::fprintf(stderr, "shardps checkpoint: %s\n", r.status().ToString().c_str());
    return 1;
  }
  std::printf("checkpoint written: %s\n", r->c_str());
  return 0;
}

}  // namespace shardps::tools
