// ucx-specific tests.
// - The shared-memory path is truly one-sided. The target process is stopped (SIGSTOP: none of
//   its threads runs, so nothing there can serve a request) while this process writes into and
//   reads from its registered region; both complete with the right bytes.
// - Malformed active messages from a raw UCP peer are refused: the connection they name is
//   closed with a clear error, and the context goes on serving others.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <condition_variable>
#include <cstring>
#include <mutex>

#include <gtest/gtest.h>
#include <ucp/api/ucp.h>

#include <thread>

#include "transport/context.h"

namespace shardps::transport {
namespace {

using namespace std::chrono_literals;

ContextOptions ShmOptions(const std::string& name) {
  ContextOptions o;
  o.name = name;
  o.backend_settings = {{"UCX_TLS", "shm,self"}};
  return o;
}

struct Waiter {
  std::mutex mu;
  std::condition_variable cv;
  int done = 0;
  std::vector<Status> st;
  DoneCallback cb() {
    return [this](Status s) {
      std::lock_guard<std::mutex> lock(mu);
      st.push_back(s);
      ++done;
      cv.notify_all();
    };
  }
  bool Wait(int n, std::chrono::milliseconds t) {
    std::unique_lock<std::mutex> lock(mu);
    return cv.wait_for(lock, t, [&] { return done >= n; });
  }
};

TEST(UcxOneSided, WritesAndReadsCompleteWhileTheTargetProcessIsStopped) {
  if (!CheckViability("ucx", ShmOptions("probe")).viable) GTEST_SKIP() << "ucx is not viable here";
  constexpr size_t kSize = 8 << 20;
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    close(fds[0]);
    alarm(60);
    auto ctx = CreateContext("ucx", ShmOptions("target"));
    if (!ctx.ok()) _exit(2);
    auto region = (*ctx)->AllocateRegion(kSize);
    if (!region.ok()) _exit(3);
    auto* mem = static_cast<uint8_t*>((*region)->data());
    for (size_t i = 0; i < kSize; ++i) mem[i] = static_cast<uint8_t>(i % 251);
    ConnectionHandlers h;
    // The first message from the peer: answer "ready", then stop this whole process.
    h.on_message = [](const std::shared_ptr<Connection>& c, Message) {
      c->Send(1, {}, {}, [](Status) { raise(SIGSTOP); });
    };
    auto l = (*ctx)->Listen("127.0.0.1:0", [h](const std::shared_ptr<Connection>&) { return h; });
    if (!l.ok()) _exit(4);
    Bytes out;
    Writer w(&out);
    w.PutString((*l)->address());
    (*region)->remote_key().Encode(&w);
    uint32_t n = static_cast<uint32_t>(out.size());
    if (write(fds[1], &n, 4) != 4 || write(fds[1], out.data(), n) != n) _exit(5);
    for (;;) pause();
  }
  close(fds[1]);
  uint32_t n = 0;
  ASSERT_EQ(read(fds[0], &n, 4), 4);
  Bytes in(n);
  ASSERT_EQ(read(fds[0], in.data(), n), static_cast<ssize_t>(n));
  close(fds[0]);
  Reader r(in.data(), in.size());
  std::string addr;
  RemoteKey key;
  ASSERT_TRUE(r.GetString(&addr) && key.Decode(&r));

  auto ctx = CreateContext("ucx", ShmOptions("initiator"));
  ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
  Waiter ready;
  ConnectionHandlers h;
  h.on_message = [&ready](const std::shared_ptr<Connection>&, Message) {
    ready.cb()(Status::OK());
  };
  auto c = (*ctx)->Connect(addr, h, 5s);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  (*c)->Send(1, {}, {}, nullptr);
  ASSERT_TRUE(ready.Wait(1, 10s));
  // Wait until the target really is stopped.
  for (int i = 0; i < 200; ++i) {
    int st = 0;
    if (waitpid(child, &st, WUNTRACED | WNOHANG) == child && WIFSTOPPED(st)) break;
    std::this_thread::sleep_for(10ms);
  }
  std::vector<uint8_t> src(1 << 20), got(1 << 20), pattern(1 << 20);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i * 7 + 3);
  Waiter ops;
  (*c)->Read(pattern.data(), pattern.size(), key, 2 << 20, ops.cb());  // what the target wrote
  (*c)->Write(src.data(), src.size(), key, 4 << 20, ops.cb());
  ASSERT_TRUE(ops.Wait(2, 10s)) << "one-sided operations waited for the stopped target";
  (*c)->Read(got.data(), got.size(), key, 4 << 20, ops.cb());  // read back what we wrote
  ASSERT_TRUE(ops.Wait(3, 10s)) << "one-sided read waited for the stopped target";
  for (auto& s : ops.st) EXPECT_TRUE(s.ok()) << s.ToString();
  for (size_t i = 0; i < pattern.size(); ++i)
    ASSERT_EQ(pattern[i], static_cast<uint8_t>((i + (2 << 20)) % 251)) << "byte " << i;
  EXPECT_EQ(got, src);
  int st = 0;
  ASSERT_EQ(waitpid(child, &st, WUNTRACED | WNOHANG), 0) << "target not stopped any more?";
  kill(child, SIGKILL);
  waitpid(child, &st, 0);
}

// A UCP peer that speaks the backend's wire format by hand (docs/transports.md): the tcp hello
// `[u64 connection id][UCP worker address]`, then active messages (id 1) whose 24-byte header
// is `u64 receiving connection id, u64 sequence, u32 tag, u32 metadata length` and whose data
// is payload then metadata.
class RawUcxPeer {
 public:
  ~RawUcxPeer() {
    if (ep_) {
      ucp_request_param_t p{};
      p.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS;
      p.flags = UCP_EP_CLOSE_FLAG_FORCE;
      ucs_status_ptr_t r = ucp_ep_close_nbx(ep_, &p);
      if (UCS_PTR_IS_PTR(r)) {
        while (ucp_request_check_status(r) == UCS_INPROGRESS) ucp_worker_progress(worker_);
        ucp_request_free(r);
      }
    }
    if (worker_) ucp_worker_destroy(worker_);
    if (ctx_) ucp_cleanup(ctx_);
  }

  // Connects the control channel to `address` and wires up an endpoint to the server's worker.
  bool Connect(const std::string& address) {
    ucp_config_t* cfg = nullptr;
    if (ucp_config_read(nullptr, nullptr, &cfg) != UCS_OK) return false;
    ucp_config_modify(cfg, "TLS", "shm,self");
    ucp_config_modify(cfg, "MM_ERROR_HANDLING", "y");
    ucp_params_t p{};
    p.field_mask = UCP_PARAM_FIELD_FEATURES;
    p.features = UCP_FEATURE_AM | UCP_FEATURE_RMA;
    ucs_status_t st = ucp_init(&p, cfg, &ctx_);
    ucp_config_release(cfg);
    if (st != UCS_OK) return false;
    ucp_worker_params_t wp{};
    if (ucp_worker_create(ctx_, &wp, &worker_) != UCS_OK) return false;
    // The server answers well-formed messages; this peer ignores the answers.
    ucp_am_handler_param_t hp{};
    hp.field_mask = UCP_AM_HANDLER_PARAM_FIELD_ID | UCP_AM_HANDLER_PARAM_FIELD_CB;
    hp.id = 1;
    hp.cb = [](void*, const void*, size_t, void*, size_t, const ucp_am_recv_param_t*) {
      return UCS_OK;
    };
    if (ucp_worker_set_am_recv_handler(worker_, &hp) != UCS_OK) return false;
    ucp_address_t* addr = nullptr;
    size_t len = 0;
    if (ucp_worker_get_address(worker_, &addr, &len) != UCS_OK) return false;
    Bytes hello;
    Writer w(&hello);
    w.Put<uint64_t>(77);  // our "connection id"
    w.PutRaw(addr, len);
    ucp_worker_release_address(worker_, addr);

    auto tcp = CreateContext("tcp", ContextOptions{});
    if (!tcp.ok()) return false;
    tcp_ctx_ = std::move(tcp).value();
    ConnectionHandlers h;
    h.on_message = [this](const std::shared_ptr<Connection>&, Message m) {
      std::lock_guard<std::mutex> lock(mu_);
      if (m.tag == 0xFFFF0001u) server_hello_ = std::move(m.meta);
    };
    h.on_close = [this](const std::shared_ptr<Connection>&, Status) {
      std::lock_guard<std::mutex> lock(mu_);
      control_closed_ = true;
    };
    auto c = tcp_ctx_->Connect(address, h, 5s);
    if (!c.ok()) return false;
    control_ = *c;
    control_->Send(0xFFFF0001u, hello, {}, nullptr);
    Bytes server;
    if (!ProgressUntil([&] {
          std::lock_guard<std::mutex> lock(mu_);
          server = server_hello_;
          return !server.empty();
        }))
      return false;
    Reader r(server.data(), server.size());
    if (!r.Get(&server_conn_)) return false;
    auto rest = r.rest();
    Bytes server_addr(rest.begin(), rest.end());
    ucp_ep_params_t ep{};
    ep.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS | UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE;
    ep.address = reinterpret_cast<const ucp_address_t*>(server_addr.data());
    ep.err_mode = UCP_ERR_HANDLING_MODE_PEER;
    if (ucp_ep_create(worker_, &ep, &ep_) != UCS_OK) return false;
    return Flush();
  }

  // Sends one active message with this header and data, and waits for it to leave.
  bool SendAm(const void* header, size_t header_len, const Bytes& data, unsigned id = 1) {
    ucp_request_param_t p{};
    ucs_status_ptr_t r = ucp_am_send_nbx(ep_, id, header, header_len,
                                         data.empty() ? nullptr : data.data(), data.size(), &p);
    return Complete(r);
  }
  static Bytes Header(uint64_t conn, uint64_t seq, uint32_t tag, uint32_t meta_len) {
    Bytes h;
    Writer w(&h);
    w.Put(conn);
    w.Put(seq);
    w.Put(tag);
    w.Put(meta_len);
    return h;
  }
  uint64_t server_conn() const { return server_conn_; }
  bool control_closed() {
    return ProgressUntil([&] {
      std::lock_guard<std::mutex> lock(mu_);
      return control_closed_;
    });
  }

 private:
  template <typename Pred>
  bool ProgressUntil(Pred pred) {
    auto end = std::chrono::steady_clock::now() + 10s;
    while (std::chrono::steady_clock::now() < end) {
      ucp_worker_progress(worker_);
      if (pred()) return true;
      std::this_thread::sleep_for(100us);
    }
    return false;
  }
  bool Complete(ucs_status_ptr_t r) {
    if (!UCS_PTR_IS_PTR(r)) return UCS_PTR_STATUS(r) == UCS_OK;
    bool ok = ProgressUntil([&] { return ucp_request_check_status(r) != UCS_INPROGRESS; });
    ucp_request_free(r);
    return ok;
  }
  bool Flush() {
    ucp_request_param_t p{};
    return Complete(ucp_ep_flush_nbx(ep_, &p));
  }

  ucp_context_h ctx_ = nullptr;
  ucp_worker_h worker_ = nullptr;
  ucp_ep_h ep_ = nullptr;
  std::unique_ptr<Context> tcp_ctx_;
  std::shared_ptr<Connection> control_;
  std::mutex mu_;
  Bytes server_hello_;           // guarded by mu_
  bool control_closed_ = false;  // guarded by mu_
  uint64_t server_conn_ = 0;
};

TEST(UcxMessages, MalformedActiveMessagesCloseOnlyThatConnection) {
  if (!CheckViability("ucx", ShmOptions("probe")).viable) GTEST_SKIP() << "ucx is not viable here";
  // Declared before the context, whose connections' handlers use them until it is destroyed.
  std::mutex mu;
  std::vector<Message> got;
  std::vector<Status> closes;
  auto server = CreateContext("ucx", ShmOptions("server"));
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  auto l = (*server)->Listen("127.0.0.1:0", [&](const std::shared_ptr<Connection>&) {
    ConnectionHandlers h;
    h.on_message = [&](const std::shared_ptr<Connection>& c, Message m) {
      std::lock_guard<std::mutex> lock(mu);
      got.push_back(std::move(m));
      c->Send(9, {}, {}, nullptr);  // an answer, for well-formed peers
    };
    h.on_close = [&](const std::shared_ptr<Connection>&, Status st) {
      std::lock_guard<std::mutex> lock(mu);
      closes.push_back(st);
    };
    return h;
  });
  ASSERT_TRUE(l.ok());
  const std::string addr = (*l)->address();

  // Not attributable to a connection (a header of the wrong size, an unknown connection id):
  // dropped; the raw peer's connection stays open and a well-formed message still arrives.
  RawUcxPeer bad;
  ASSERT_TRUE(bad.Connect(addr));
  Bytes data = {1, 2, 3, 4, 5, 6, 7, 8};
  uint8_t short_header[3] = {1, 2, 3};
  ASSERT_TRUE(bad.SendAm(short_header, sizeof(short_header), data));
  Bytes unknown = RawUcxPeer::Header(bad.server_conn() + 1000, 0, 5, 4);
  ASSERT_TRUE(bad.SendAm(unknown.data(), unknown.size(), data));
  ASSERT_TRUE(bad.SendAm(unknown.data(), unknown.size(), data, 7));  // an id nobody handles
  Bytes good = RawUcxPeer::Header(bad.server_conn(), 0, 5, 4);       // 4 payload, 4 metadata bytes
  ASSERT_TRUE(bad.SendAm(good.data(), good.size(), data));
  for (int i = 0; i < 1000; ++i) {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (!got.empty()) break;
    }
    std::this_thread::sleep_for(5ms);
  }
  {
    std::lock_guard<std::mutex> lock(mu);
    ASSERT_EQ(got.size(), 1u) << "the well-formed message did not arrive alone";
    EXPECT_EQ(got[0].tag, 5u);
    EXPECT_EQ(got[0].payload.size(), 4u);
    EXPECT_EQ(got[0].meta, (Bytes{5, 6, 7, 8}));
    EXPECT_TRUE(closes.empty());
  }
  // Attributable but malformed: metadata longer than the message, a reserved tag, a sequence
  // number already delivered. Each closes that connection with an error and delivers nothing.
  struct Case {
    const char* what;
    uint64_t seq;
    uint32_t tag, meta_len;
  };
  for (const Case& k : {Case{"metadata longer than the message", 0, 5, 100},
                        Case{"a reserved tag", 0, 0xFFFF0001u, 4},
                        Case{"a sequence number already used", 5, 5, 4}}) {
    SCOPED_TRACE(k.what);
    size_t closes_before;
    {
      std::lock_guard<std::mutex> lock(mu);
      closes_before = closes.size();
      got.clear();
    }
    RawUcxPeer peer;
    ASSERT_TRUE(peer.Connect(addr));
    if (k.seq > 0) {  // deliver seq 0..k.seq-1 first, then repeat one of them
      for (uint64_t q = 0; q < k.seq; ++q) {
        Bytes h = RawUcxPeer::Header(peer.server_conn(), q, 5, 4);
        ASSERT_TRUE(peer.SendAm(h.data(), h.size(), data));
      }
      Bytes again = RawUcxPeer::Header(peer.server_conn(), 1, 5, 4);
      ASSERT_TRUE(peer.SendAm(again.data(), again.size(), data));
    } else {
      Bytes h = RawUcxPeer::Header(peer.server_conn(), 0, k.tag, k.meta_len);
      ASSERT_TRUE(peer.SendAm(h.data(), h.size(), data));
    }
    EXPECT_TRUE(peer.control_closed()) << "the server did not close the connection";
    for (int i = 0; i < 1000; ++i) {  // on_close follows on the server's own thread
      {
        std::lock_guard<std::mutex> lock(mu);
        if (closes.size() > closes_before) break;
      }
      std::this_thread::sleep_for(5ms);
    }
    std::lock_guard<std::mutex> lock(mu);
    ASSERT_EQ(closes.size(), closes_before + 1);
    EXPECT_FALSE(closes.back().ok()) << "closed without an error";
    EXPECT_EQ(got.size(), k.seq);  // only the well-formed ones before it
  }
  // The server still serves a proper client.
  Waiter answered;
  auto client = CreateContext("ucx", ShmOptions("client"));
  ASSERT_TRUE(client.ok());
  ConnectionHandlers h;
  h.on_message = [&](const std::shared_ptr<Connection>&, Message m) {
    if (m.tag == 9) answered.cb()(Status::OK());
  };
  auto c = (*client)->Connect(addr, h, 5s);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  (*c)->Send(5, {1}, {}, nullptr);
  EXPECT_TRUE(answered.Wait(1, 10s));
}

// Messages that wait for an earlier one (delivered in sequence order) are held within the
// connection's inbound budget, and a sequence number far ahead is refused: a peer cannot make
// the server hold what it likes.
TEST(UcxMessages, HeldMessagesAreBoundedByTheInboundBudget) {
  if (!CheckViability("ucx", ShmOptions("probe")).viable) GTEST_SKIP() << "ucx is not viable here";
  std::mutex mu;
  std::vector<Status> closes;
  auto budget = std::make_shared<InboundBudget>(1 << 20);
  ContextOptions o = ShmOptions("server");
  o.connection_inbound_bytes = 64 << 10;
  o.inbound_budget = budget;
  auto server = CreateContext("ucx", o);
  ASSERT_TRUE(server.ok()) << server.status().ToString();
  auto l = (*server)->Listen("127.0.0.1:0", [&](const std::shared_ptr<Connection>&) {
    ConnectionHandlers h;
    h.on_close = [&](const std::shared_ptr<Connection>&, Status st) {
      std::lock_guard<std::mutex> lock(mu);
      closes.push_back(st);
    };
    return h;
  });
  ASSERT_TRUE(l.ok());
  auto wait_close = [&](size_t n) {
    for (int i = 0; i < 1000; ++i) {
      {
        std::lock_guard<std::mutex> lock(mu);
        if (closes.size() >= n) return true;
      }
      std::this_thread::sleep_for(5ms);
    }
    return false;
  };
  {
    RawUcxPeer peer;
    ASSERT_TRUE(peer.Connect((*l)->address()));
    Bytes data(30 << 10, 7);
    // Sequence 0 never comes: 1 and 2 wait (60 KiB), 3 would pass the 64 KiB budget.
    for (uint64_t seq = 1; seq <= 3; ++seq) {
      Bytes h = RawUcxPeer::Header(peer.server_conn(), seq, 5, 4);
      ASSERT_TRUE(peer.SendAm(h.data(), h.size(), data));
    }
    EXPECT_TRUE(peer.control_closed());
    ASSERT_TRUE(wait_close(1));
    std::lock_guard<std::mutex> lock(mu);
    EXPECT_NE(closes[0].message().find("inbound budget"), std::string::npos)
        << closes[0].ToString();
  }
  {
    RawUcxPeer peer;
    ASSERT_TRUE(peer.Connect((*l)->address()));
    Bytes h = RawUcxPeer::Header(peer.server_conn(), 1ull << 40, 5, 4);
    ASSERT_TRUE(peer.SendAm(h.data(), h.size(), Bytes(8, 1)));
    EXPECT_TRUE(peer.control_closed());
    ASSERT_TRUE(wait_close(2));
  }
  for (int i = 0; i < 1000 && budget->used() != 0; ++i) std::this_thread::sleep_for(5ms);
  EXPECT_EQ(budget->used(), 0u);  // closed connections gave their share back
  EXPECT_LE(budget->peak(), 64u << 10);
}

}  // namespace
}  // namespace shardps::transport
