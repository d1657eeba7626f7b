// The transport contract, written once and instantiated for every backend viable here
// (docs/transports.md). Each test bounds every wait; nothing here can hang.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <future>
#include <mutex>
#include <numeric>
#include <thread>

#include <gtest/gtest.h>

#include "transport/context.h"

namespace shardps::transport {
namespace {

using namespace std::chrono_literals;

struct BackendParam {
  std::string label;  // test name suffix
  std::string backend;
  std::vector<std::pair<std::string, std::string>> settings;
  // Where servers listen: loopback, except over an RDMA device (rdma_cm binds the address of an
  // RDMA interface; scripts/test-rdma.sh sets SHARDPS_RDMA_ADDRESS in its virtual machine).
  std::string host = "127.0.0.1";
  bool needs_rdma = false;
};

// The address of an RDMA interface to test on, or empty.
std::string RdmaAddress() {
  const char* a = std::getenv("SHARDPS_RDMA_ADDRESS");
  return a ? a : "";
}

void PrintTo(const BackendParam& p, std::ostream* os) { *os << p.label; }

std::string ParamName(const ::testing::TestParamInfo<BackendParam>& info) {
  return info.param.label;
}

// Records one completion and checks it fires exactly once and never inline.
class Probe {
 public:
  DoneCallback Callback() {
    calls_issued_++;
    return [this](Status st) {
      std::lock_guard<std::mutex> lock(mu_);
      if (in_call_.load() && caller_ == std::this_thread::get_id()) inline_ = true;
      statuses_.push_back(st);
      cv_.notify_all();
    };
  }
  // Marks the start/end of the call that may not invoke the callback inline.
  void EnterCall() {
    caller_ = std::this_thread::get_id();
    in_call_ = true;
  }
  void LeaveCall() { in_call_ = false; }
  bool WaitFor(size_t n, std::chrono::milliseconds timeout = 20s) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return statuses_.size() >= n; });
  }
  std::vector<Status> statuses() {
    std::lock_guard<std::mutex> lock(mu_);
    return statuses_;
  }
  bool fired_inline() const { return inline_; }
  size_t issued() const { return calls_issued_; }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<Status> statuses_;
  std::atomic<bool> in_call_{false};
  std::thread::id caller_;
  bool inline_ = false;
  size_t calls_issued_ = 0;
};

// Messages and close events seen on one side.
class Inbox {
 public:
  ConnectionHandlers Handlers() {
    ConnectionHandlers h;
    h.on_message = [this](const std::shared_ptr<Connection>& c, Message m) {
      std::lock_guard<std::mutex> lock(mu_);
      if (on_receipt_) on_receipt_(m);
      messages_.push_back(std::move(m));
      last_conn_ = c;
      cv_.notify_all();
    };
    h.on_close = [this](const std::shared_ptr<Connection>&, Status st) {
      std::lock_guard<std::mutex> lock(mu_);
      closes_.push_back(st);
      cv_.notify_all();
    };
    return h;
  }
  bool WaitMessages(size_t n, std::chrono::milliseconds timeout = 30s) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return messages_.size() >= n; });
  }
  bool WaitCloses(size_t n, std::chrono::milliseconds timeout = 20s) {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, timeout, [&] { return closes_.size() >= n; });
  }
  Message Take() {
    std::lock_guard<std::mutex> lock(mu_);
    Message m = std::move(messages_.front());
    messages_.pop_front();
    return m;
  }
  size_t closes() {
    std::lock_guard<std::mutex> lock(mu_);
    return closes_.size();
  }

  // `fn` runs on the loop thread as each message arrives, under the inbox's lock.
  void OnReceipt(std::function<void(const Message&)> fn) {
    std::lock_guard<std::mutex> lock(mu_);
    on_receipt_ = std::move(fn);
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Message> messages_;
  std::vector<Status> closes_;
  std::function<void(const Message&)> on_receipt_;
  std::shared_ptr<Connection> last_conn_;
};

class TransportConformance : public ::testing::TestWithParam<BackendParam> {
 protected:
  void SetUp() override {
    ContextOptions o;
    o.backend_settings = GetParam().settings;
    if (GetParam().needs_rdma) {
      Viability rdma = CheckViability("verbs");
      if (!rdma.viable) GTEST_SKIP() << "no RDMA device here: " << rdma.reason;
      if (RdmaAddress().empty())
        GTEST_SKIP() << "set SHARDPS_RDMA_ADDRESS to the address of an RDMA interface "
                        "(scripts/test-rdma.sh runs these in a virtual machine with soft-RoCE)";
    }
    Viability v = CheckViability(GetParam().backend, o);
    if (!v.viable) GTEST_SKIP() << GetParam().backend << " is not viable here: " << v.reason;
  }
  // Contexts go first: closing them fires callbacks into the inboxes below.
  void TearDown() override {
    conn_.reset();
    listener_.reset();
    client_.reset();
    server_.reset();
    accepted_.clear();
  }
  ContextOptions Options(const std::string& name) {
    ContextOptions o;
    o.name = name;
    o.backend_settings = GetParam().settings;
    // Message256MiB sends 256 MiB and metadata in one message: more than the default budget of
    // a connection (256 MiB), so the suite's contexts allow 512 MiB (tcp_test and ucx_test check
    // the budgets themselves).
    o.connection_inbound_bytes = 512ull << 20;
    return o;
  }
  static std::string Host() { return GetParam().needs_rdma ? RdmaAddress() : GetParam().host; }
  std::unique_ptr<Context> MakeContext(const std::string& name) {
    auto ctx = CreateContext(GetParam().backend, Options(name));
    EXPECT_TRUE(ctx.ok()) << ctx.status().ToString();
    return ctx.ok() ? std::move(ctx).value() : nullptr;
  }

  // A server context listening, and a client connected to it.
  void Connect() {
    server_ = MakeContext("srv");
    client_ = MakeContext("cli");
    ASSERT_TRUE(server_ && client_);
    auto l = server_->Listen(Host() + ":0", [this](const std::shared_ptr<Connection>& c) {
      std::lock_guard<std::mutex> lock(mu_);
      accepted_.push_back(c);
      return server_inbox_.Handlers();
    });
    ASSERT_TRUE(l.ok()) << l.status().ToString();
    listener_ = std::move(l).value();
    auto c = client_->Connect(listener_->address(), client_inbox_.Handlers(), 5s);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    conn_ = *c;
  }

  std::unique_ptr<Context> server_, client_;
  std::unique_ptr<Listener> listener_;
  std::shared_ptr<Connection> conn_;
  std::mutex mu_;
  std::vector<std::shared_ptr<Connection>> accepted_;
  Inbox server_inbox_, client_inbox_;
};

TEST_P(TransportConformance, MessageArrivesWithTagMetaAndPayload) {
  Connect();
  Probe probe;
  Bytes meta = {1, 2, 3};
  std::vector<uint8_t> payload(1000);
  std::iota(payload.begin(), payload.end(), 0);
  probe.EnterCall();
  conn_->Send(42, meta, Payload::View(payload.data(), payload.size()), probe.Callback());
  probe.LeaveCall();
  ASSERT_TRUE(probe.WaitFor(1));
  ASSERT_TRUE(server_inbox_.WaitMessages(1));
  Message m = server_inbox_.Take();
  EXPECT_EQ(m.tag, 42u);
  EXPECT_EQ(m.meta, meta);
  ASSERT_EQ(m.payload.size(), payload.size());
  EXPECT_EQ(0, std::memcmp(m.payload.data(), payload.data(), payload.size()));
  EXPECT_TRUE(probe.statuses()[0].ok());
  EXPECT_FALSE(probe.fired_inline());
}

TEST_P(TransportConformance, ZeroLengthMessage) {
  Connect();
  Probe probe;
  probe.EnterCall();
  conn_->Send(7, {}, Payload{}, probe.Callback());
  probe.LeaveCall();
  ASSERT_TRUE(probe.WaitFor(1));
  ASSERT_TRUE(server_inbox_.WaitMessages(1));
  Message m = server_inbox_.Take();
  EXPECT_EQ(m.tag, 7u);
  EXPECT_TRUE(m.meta.empty());
  EXPECT_EQ(m.payload.size(), 0u);
  EXPECT_FALSE(probe.fired_inline());
}

TEST_P(TransportConformance, Message256MiB) {
  Connect();
  constexpr size_t kSize = 256ull << 20;
  std::vector<uint32_t> payload(kSize / 4);
  for (size_t i = 0; i < payload.size(); ++i) payload[i] = static_cast<uint32_t>(i * 2654435761u);
  Probe probe;
  Bytes meta = {9, 8, 7, 6, 5};  // metadata and payload together (ucx: a two-part send)
  conn_->Send(1, meta, Payload::View(payload.data(), kSize), probe.Callback());
  ASSERT_TRUE(probe.WaitFor(1, 60s));
  ASSERT_TRUE(server_inbox_.WaitMessages(1, 60s));
  Message m = server_inbox_.Take();
  EXPECT_EQ(m.meta, meta);
  ASSERT_EQ(m.payload.size(), kSize);
  EXPECT_EQ(0, std::memcmp(m.payload.data(), payload.data(), kSize));
}

TEST_P(TransportConformance, SixtyFourConcurrentConnections) {
  server_ = MakeContext("srv");
  ASSERT_TRUE(server_);
  // The server echoes every message back on the connection it came from.
  ConnectionHandlers echo;
  echo.on_message = [](const std::shared_ptr<Connection>& c, Message m) {
    c->Send(m.tag, std::move(m.meta), Payload{}, nullptr);
  };
  auto l = server_->Listen(Host() + ":0", [&](const std::shared_ptr<Connection>&) { return echo; });
  ASSERT_TRUE(l.ok());
  constexpr int kConns = 64;
  std::vector<std::unique_ptr<Context>> clients;
  std::vector<std::unique_ptr<Inbox>> inboxes;
  std::vector<std::shared_ptr<Connection>> conns;
  auto one = MakeContext("cli");  // one context, 64 connections
  for (int i = 0; i < kConns; ++i) {
    inboxes.push_back(std::make_unique<Inbox>());
    auto c = one->Connect((*l)->address(), inboxes.back()->Handlers(), 5s);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    conns.push_back(*c);
  }
  for (int round = 0; round < 10; ++round)
    for (int i = 0; i < kConns; ++i) {
      Bytes meta(4);
      std::memcpy(meta.data(), &i, 4);
      conns[i]->Send(static_cast<uint32_t>(round), meta, Payload{}, nullptr);
    }
  for (int i = 0; i < kConns; ++i) {
    ASSERT_TRUE(inboxes[i]->WaitMessages(10)) << "connection " << i;
    for (int round = 0; round < 10; ++round) {
      Message m = inboxes[i]->Take();
      EXPECT_EQ(m.tag, static_cast<uint32_t>(round));
      int who = -1;
      std::memcpy(&who, m.meta.data(), 4);
      EXPECT_EQ(who, i);
    }
  }
}

TEST_P(TransportConformance, OneSidedWriteThenReadReturnsTheBytes) {
  Connect();
  auto region = server_->AllocateRegion(1 << 20);
  ASSERT_TRUE(region.ok()) << region.status().ToString();
  RemoteKey key = (*region)->remote_key();
  std::vector<uint8_t> src(4096);
  for (size_t i = 0; i < src.size(); ++i) src[i] = static_cast<uint8_t>(i * 7 + 1);
  Probe wprobe;
  wprobe.EnterCall();
  conn_->Write(src.data(), src.size(), key, 8192, wprobe.Callback());
  wprobe.LeaveCall();
  ASSERT_TRUE(wprobe.WaitFor(1));
  ASSERT_TRUE(wprobe.statuses()[0].ok()) << wprobe.statuses()[0].ToString();
  EXPECT_EQ(0, std::memcmp(static_cast<uint8_t*>((*region)->data()) + 8192, src.data(), 4096));
  std::vector<uint8_t> dst(4096, 0);
  Probe rprobe;
  rprobe.EnterCall();
  conn_->Read(dst.data(), dst.size(), key, 8192, rprobe.Callback());
  rprobe.LeaveCall();
  ASSERT_TRUE(rprobe.WaitFor(1));
  ASSERT_TRUE(rprobe.statuses()[0].ok()) << rprobe.statuses()[0].ToString();
  EXPECT_EQ(src, dst);
  EXPECT_FALSE(wprobe.fired_inline());
  EXPECT_FALSE(rprobe.fired_inline());
}

// Typed registration: memory the caller owns, registered as host memory, is written and read
// one-sidedly like allocated memory; local spans of registered regions are the source and the
// destination; the kind is reported.
TEST_P(TransportConformance, RegisteredCallerMemoryAndLocalSpans) {
  Connect();
  std::vector<uint8_t> owned(64 << 10, 0);
  auto region = server_->RegisterRegion(owned.data(), owned.size(), MemoryKind::kHost);
  ASSERT_TRUE(region.ok()) << region.status().ToString();
  EXPECT_EQ((*region)->kind(), MemoryKind::kHost);
  EXPECT_EQ((*region)->data(), owned.data());
  auto local = client_->AllocateRegion(8192);
  ASSERT_TRUE(local.ok());
  auto* l = static_cast<uint8_t*>((*local)->data());
  for (size_t i = 0; i < 4096; ++i) l[i] = static_cast<uint8_t>(i * 13 + 5);
  Probe probe;
  probe.EnterCall();
  conn_->Write(LocalSpan{local->get(), 0, 4096}, (*region)->remote_key(), 1000, probe.Callback());
  probe.LeaveCall();
  ASSERT_TRUE(probe.WaitFor(1));
  ASSERT_TRUE(probe.statuses()[0].ok()) << probe.statuses()[0].ToString();
  // Checked on the server's loop thread: over ucx shared memory, a put into memory UCX did not
  // allocate is carried out by the target's progress thread (docs/transports.md), and the
  // completion reaches this thread through memory ThreadSanitizer does not see.
  std::promise<bool> same;
  ASSERT_TRUE(
      server_->RunInLoop([&] { same.set_value(std::memcmp(owned.data() + 1000, l, 4096) == 0); }));
  EXPECT_TRUE(same.get_future().get());
  conn_->Read(LocalSpan{local->get(), 4096, 4096}, (*region)->remote_key(), 1000, probe.Callback());
  ASSERT_TRUE(probe.WaitFor(2));
  ASSERT_TRUE(probe.statuses()[1].ok()) << probe.statuses()[1].ToString();
  EXPECT_EQ(0, std::memcmp(l + 4096, l, 4096));
  // A span outside its region fails, not inline, and touches nothing.
  Probe bad;
  bad.EnterCall();
  conn_->Write(LocalSpan{local->get(), 8000, 400}, (*region)->remote_key(), 0, bad.Callback());
  bad.LeaveCall();
  ASSERT_TRUE(bad.WaitFor(1));
  EXPECT_TRUE(bad.statuses()[0].IsInvalidArgument()) << bad.statuses()[0].ToString();
  EXPECT_FALSE(bad.fired_inline());
  std::promise<uint8_t> first;
  ASSERT_TRUE(server_->RunInLoop([&] { first.set_value(owned[0]); }));
  EXPECT_EQ(first.get_future().get(), 0);
}

// Each backend says which memory kinds it registers, and refuses the others clearly.
TEST_P(TransportConformance, MemoryKindsABackendCannotRegisterAreRefused) {
  server_ = MakeContext("srv");
  ASSERT_TRUE(server_);
  EXPECT_TRUE(server_->CanRegister(MemoryKind::kHost));
  if (server_->CanRegister(MemoryKind::kCuda)) GTEST_SKIP() << "this backend registers CUDA memory";
  std::vector<uint8_t> mem(4096);
  auto r = server_->RegisterRegion(mem.data(), mem.size(), MemoryKind::kCuda);
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsInvalidArgument()) << r.status().ToString();
  EXPECT_NE(r.status().message().find("cuda"), std::string::npos) << r.status().ToString();
}

TEST_P(TransportConformance, ZeroLengthWriteAndRead) {
  Connect();
  auto region = server_->AllocateRegion(64);
  ASSERT_TRUE(region.ok());
  Probe probe;
  uint8_t b = 0;
  conn_->Write(&b, 0, (*region)->remote_key(), 0, probe.Callback());
  conn_->Read(&b, 0, (*region)->remote_key(), 64, probe.Callback());
  ASSERT_TRUE(probe.WaitFor(2));
  for (auto& st : probe.statuses()) EXPECT_TRUE(st.ok()) << st.ToString();
}

TEST_P(TransportConformance, AccessOutsideRegionIsRefusedAndCorruptsNothing) {
  Connect();
  auto region = server_->AllocateRegion(4096);
  ASSERT_TRUE(region.ok());
  auto* mem = static_cast<uint8_t*>((*region)->data());
  std::memset(mem, 0xAB, 4096);
  RemoteKey key = (*region)->remote_key();
  std::vector<uint8_t> src(8192, 0x11);
  std::vector<uint8_t> dst(8192, 0x22);
  Probe probe;
  conn_->Write(src.data(), 100, key, 4000, probe.Callback());     // crosses the end
  conn_->Write(src.data(), 8192, key, 0, probe.Callback());       // larger than the region
  conn_->Write(src.data(), 1, key, ~0ull, probe.Callback());      // offset overflow
  conn_->Read(dst.data(), 100, key, 4000, probe.Callback());      // read crosses the end
  conn_->Read(dst.data(), 16, key, ~0ull - 4, probe.Callback());  // overflow
  ASSERT_TRUE(probe.WaitFor(5));
  for (auto& st : probe.statuses()) EXPECT_FALSE(st.ok());
  for (int i = 0; i < 4096; ++i) ASSERT_EQ(mem[i], 0xAB) << "byte " << i;
  for (int i = 0; i < 8192; ++i) ASSERT_EQ(dst[i], 0x22) << "byte " << i;
  // The connection still works after the refusals.
  Probe ok;
  conn_->Write(src.data(), 16, key, 0, ok.Callback());
  ASSERT_TRUE(ok.WaitFor(1));
  EXPECT_TRUE(ok.statuses()[0].ok()) << ok.statuses()[0].ToString();
  EXPECT_EQ(mem[0], 0x11);
}

// A write followed by its message: the peer receives the message only once the written bytes
// are in place (checked as each message arrives), for many at once.
TEST_P(TransportConformance, WriteThenSendDeliversTheMessageAfterItsBytes) {
  constexpr size_t kPiece = 64 << 10, kPieces = 20;
  Connect();
  auto region = server_->AllocateRegion(kPiece * kPieces);
  ASSERT_TRUE(region.ok()) << region.status().ToString();
  const auto* mem = static_cast<const uint8_t*>((*region)->data());
  std::atomic<int> in_place{0};
  server_inbox_.OnReceipt([&](const Message& m) {
    if (m.tag != 9 || m.meta.size() != 1 || m.payload.size() != 0) return;
    const size_t k = m.meta[0];
    bool whole = k < kPieces;
    for (size_t i = 0; whole && i < kPiece; ++i) whole = mem[k * kPiece + i] == k + 1;
    if (whole) in_place++;
  });
  std::vector<std::vector<uint8_t>> src;
  for (size_t k = 0; k < kPieces; ++k) src.emplace_back(kPiece, static_cast<uint8_t>(k + 1));
  Probe probe;
  probe.EnterCall();
  for (size_t k = 0; k < kPieces; ++k)
    conn_->WriteThenSend(src[k].data(), kPiece, (*region)->remote_key(), k * kPiece, 9,
                         Bytes{static_cast<uint8_t>(k)}, probe.Callback());
  probe.LeaveCall();
  ASSERT_TRUE(probe.WaitFor(kPieces));
  for (auto& st : probe.statuses()) EXPECT_TRUE(st.ok()) << st.ToString();
  ASSERT_TRUE(server_inbox_.WaitMessages(kPieces));
  EXPECT_EQ(in_place.load(), static_cast<int>(kPieces));
  EXPECT_FALSE(probe.fired_inline());
}

// Messages and write-then-sends from one thread: every one arrives once, the messages in the
// order they were sent, and each write-then-send's bytes are in place when its message arrives.
// tcp and verbs keep the order across both kinds too (verbs: a SEND on the queue pair when the
// metadata fits inline, else the tcp connection, numbered either way); ucx sends a
// write-then-send's message once its write completed, so later messages may overtake it.
TEST_P(TransportConformance, MessagesAndWriteThenSendsArriveInOrder) {
  constexpr size_t kPiece = 4096, kRounds = 60;
  Connect();
  auto region = server_->AllocateRegion(kPiece * kRounds);
  ASSERT_TRUE(region.ok()) << region.status().ToString();
  const auto* mem = static_cast<const uint8_t*>((*region)->data());
  std::atomic<int> in_place{0};
  server_inbox_.OnReceipt([&](const Message& m) {
    if (m.tag != 12 || m.meta.size() < 2) return;
    const size_t k = m.meta[0];
    bool whole = k < kRounds;
    for (size_t i = 0; whole && i < kPiece; ++i) whole = mem[k * kPiece + i] == (k & 0x7F) + 1;
    if (whole) in_place++;
  });
  std::vector<std::vector<uint8_t>> src;
  for (size_t k = 0; k < kRounds; ++k)
    src.emplace_back(kPiece, static_cast<uint8_t>((k & 0x7F) + 1));
  Probe probe;
  for (size_t k = 0; k < kRounds; ++k) {
    // Metadata of 2 bytes, and every third round of 3000 (too large to travel inline).
    Bytes meta(k % 3 == 2 ? 3000 : 2, static_cast<uint8_t>(k));
    conn_->Send(11, Bytes{static_cast<uint8_t>(k)}, {}, probe.Callback());
    conn_->WriteThenSend(src[k].data(), kPiece, (*region)->remote_key(), k * kPiece, 12,
                         std::move(meta), probe.Callback());
  }
  ASSERT_TRUE(probe.WaitFor(2 * kRounds));
  for (auto& st : probe.statuses()) EXPECT_TRUE(st.ok()) << st.ToString();
  ASSERT_TRUE(server_inbox_.WaitMessages(2 * kRounds));
  const bool ordered = GetParam().backend != "ucx";
  size_t next_send = 0;
  std::vector<int> seen(kRounds, 0);
  for (size_t i = 0; i < 2 * kRounds; ++i) {
    Message m = server_inbox_.Take();
    if (ordered) {
      ASSERT_EQ(m.tag, i % 2 ? 12u : 11u) << "message " << i;
    }
    if (m.tag == 11) {
      ASSERT_EQ(m.meta, Bytes{static_cast<uint8_t>(next_send)});
      next_send++;
      continue;
    }
    ASSERT_EQ(m.tag, 12u);
    const size_t k = m.meta[0];
    ASSERT_LT(k, kRounds);
    if (ordered) {
      ASSERT_EQ(k, i / 2);
    }
    ASSERT_EQ(m.meta.size(), k % 3 == 2 ? 3000u : 2u);
    seen[k]++;
  }
  EXPECT_EQ(next_send, kRounds);
  EXPECT_EQ(seen, std::vector<int>(kRounds, 1));
  EXPECT_EQ(in_place.load(), static_cast<int>(kRounds));
}

// A write-then-send that fails (its key went stale) delivers nothing, and holds back none of
// the messages sent after it.
TEST_P(TransportConformance, AFailedWriteThenSendHoldsBackNothing) {
  Connect();
  auto region = server_->AllocateRegion(4096);
  ASSERT_TRUE(region.ok());
  RemoteKey stale = (*region)->remote_key();
  region->reset();  // deregistered: the key is stale
  std::vector<uint8_t> src(64, 0x5A);
  Probe probe;
  conn_->WriteThenSend(src.data(), src.size(), stale, 0, 13, Bytes{1}, probe.Callback());
  ASSERT_TRUE(probe.WaitFor(1));
  if (!probe.statuses()[0].ok()) {
    conn_->Send(14, Bytes{2}, {}, probe.Callback());
    ASSERT_TRUE(probe.WaitFor(2));
    ASSERT_TRUE(server_inbox_.WaitMessages(1));
    Message m = server_inbox_.Take();
    EXPECT_EQ(m.tag, 14u);
  } else {
    // tcp: the write-then-send travels whole and the peer refuses it by closing.
    EXPECT_TRUE(client_inbox_.WaitCloses(1));
  }
}

// A write-then-send outside the peer's region touches nothing and delivers nothing: its
// completion fails, or (tcp, where no answer travels back) the peer closes the connection.
TEST_P(TransportConformance, WriteThenSendOutsideTheRegionDeliversNothing) {
  Connect();
  auto region = server_->AllocateRegion(4096);
  ASSERT_TRUE(region.ok());
  auto* mem = static_cast<uint8_t*>((*region)->data());
  std::memset(mem, 0xAB, 4096);
  std::vector<uint8_t> src(200, 0x11);
  Probe probe;
  conn_->WriteThenSend(src.data(), src.size(), (*region)->remote_key(), 4000, 9, Bytes{1},
                       probe.Callback());
  ASSERT_TRUE(probe.WaitFor(1));
  if (probe.statuses()[0].ok()) {
    EXPECT_TRUE(client_inbox_.WaitCloses(1));
  }
  for (int i = 0; i < 4096; ++i) ASSERT_EQ(mem[i], 0xAB) << "byte " << i;
  EXPECT_FALSE(server_inbox_.WaitMessages(1, 200ms));
}

TEST_P(TransportConformance, WrongOrStaleKeyIsRefused) {
  Connect();
  auto region = server_->AllocateRegion(4096);
  ASSERT_TRUE(region.ok());
  RemoteKey stale = (*region)->remote_key();
  RemoteKey wrong = stale;
  wrong.packed.back() ^= 0x5A;  // corrupt the key
  std::vector<uint8_t> src(64, 0x33), dst(64, 0x44);
  Probe probe;
  conn_->Write(src.data(), 64, wrong, 0, probe.Callback());
  ASSERT_TRUE(probe.WaitFor(1));
  EXPECT_FALSE(probe.statuses()[0].ok());
  EXPECT_EQ(static_cast<uint8_t*>((*region)->data())[0], 0);
  region->reset();  // deregister: the key becomes stale
  conn_->Write(src.data(), 64, stale, 0, probe.Callback());
  conn_->Read(dst.data(), 64, stale, 0, probe.Callback());
  ASSERT_TRUE(probe.WaitFor(3));
  EXPECT_FALSE(probe.statuses()[1].ok());
  EXPECT_FALSE(probe.statuses()[2].ok());
  EXPECT_EQ(dst, std::vector<uint8_t>(64, 0x44));
}

TEST_P(TransportConformance, CloseWithPendingOperationsFiresEveryCallbackOnce) {
  if (GetParam().label == "ucx_tcp")
    GTEST_SKIP() << "UCX 1.13 (Debian) over uct-tcp crashed once in CI inside its own progress "
                    "here (uct_tcp_iface_progress -> uct_iface_mem_alloc -> uct_md_query on a "
                    "null memory domain) while a closed endpoint's transfers were torn down; "
                    "not reproduced in 80 runs since, so skipped rather than left flaky (the "
                    "tcp and ucx_shm cases run)";
  Connect();
  auto region = server_->AllocateRegion(16 << 20);
  ASSERT_TRUE(region.ok());
  std::vector<uint8_t> big(16 << 20, 5);
  std::vector<uint8_t> sink(16 << 20);
  Probe probe;
  for (int i = 0; i < 8; ++i) {
    conn_->Write(big.data(), big.size(), (*region)->remote_key(), 0, probe.Callback());
    conn_->Read(sink.data(), sink.size(), (*region)->remote_key(), 0, probe.Callback());
    conn_->Send(1, {}, Payload::View(big.data(), big.size()), probe.Callback());
  }
  conn_->Close();
  ASSERT_TRUE(probe.WaitFor(probe.issued(), 30s));
  ASSERT_TRUE(client_inbox_.WaitCloses(1));
  // Nothing fires twice: give late duplicates a chance to show up.
  std::this_thread::sleep_for(100ms);
  EXPECT_EQ(probe.statuses().size(), probe.issued());
  EXPECT_EQ(client_inbox_.closes(), 1u);
  // Operations on a closed connection fail, still through their callback.
  Probe after;
  after.EnterCall();
  conn_->Send(1, {}, Payload{}, after.Callback());
  after.LeaveCall();
  ASSERT_TRUE(after.WaitFor(1));
  EXPECT_FALSE(after.statuses()[0].ok());
  EXPECT_FALSE(after.fired_inline());
}

TEST_P(TransportConformance, DestroyingTheContextFailsPendingOperations) {
  if (GetParam().label == "ucx_tcp")
    GTEST_SKIP() << "UCX 1.13 (Debian) can abort the surviving process when a peer's worker "
                    "disappears while a uct-tcp wire-up reply to it is pending (assertion in "
                    "ucp_request_send_state_ff, removed upstream by openucx/ucx PR #8175)";
  Connect();
  auto region = server_->AllocateRegion(8 << 20);
  ASSERT_TRUE(region.ok());
  std::vector<uint8_t> big(8 << 20, 9);
  Probe probe;
  for (int i = 0; i < 4; ++i)
    conn_->Write(big.data(), big.size(), (*region)->remote_key(), 0, probe.Callback());
  client_.reset();
  ASSERT_TRUE(probe.WaitFor(4, 10s));
  EXPECT_EQ(probe.statuses().size(), 4u);
}

// A peer process killed while a large transfer is under way: the operation fails within a
// bounded time instead of hanging.
TEST_P(TransportConformance, PeerKilledMidTransferFailsWithinBoundedTime) {
  int fds[2];
  ASSERT_EQ(pipe(fds), 0);
  pid_t child = fork();
  ASSERT_GE(child, 0);
  if (child == 0) {
    close(fds[0]);
    alarm(60);  // never outlive the test
    auto ctx = CreateContext(GetParam().backend, Options("victim"));
    if (!ctx.ok()) _exit(2);
    auto region = (*ctx)->AllocateRegion(512 << 20);
    Bytes key;
    Writer w(&key);
    (*region)->remote_key().Encode(&w);
    auto l = (*ctx)->Listen(
        Host() + ":0", [](const std::shared_ptr<Connection>&) { return ConnectionHandlers{}; });
    if (!l.ok()) _exit(3);
    std::string addr = (*l)->address();
    uint32_t n = static_cast<uint32_t>(addr.size());
    uint32_t k = static_cast<uint32_t>(key.size());
    if (write(fds[1], &n, 4) != 4 || write(fds[1], addr.data(), n) != n ||
        write(fds[1], &k, 4) != 4 || write(fds[1], key.data(), k) != k)
      _exit(4);
    for (;;) pause();
  }
  close(fds[1]);
  uint32_t n = 0, k = 0;
  ASSERT_EQ(read(fds[0], &n, 4), 4);
  std::string addr(n, '\0');
  ASSERT_EQ(read(fds[0], addr.data(), n), static_cast<ssize_t>(n));
  ASSERT_EQ(read(fds[0], &k, 4), 4);
  Bytes keybytes(k);
  ASSERT_EQ(read(fds[0], keybytes.data(), k), static_cast<ssize_t>(k));
  close(fds[0]);
  RemoteKey key;
  Reader r(keybytes.data(), keybytes.size());
  ASSERT_TRUE(key.Decode(&r));

  client_ = MakeContext("cli");
  Inbox inbox;
  auto c = client_->Connect(addr, inbox.Handlers(), 5s);
  ASSERT_TRUE(c.ok()) << c.status().ToString();
  std::vector<uint8_t> big(512 << 20, 1);
  Probe probe;
  for (int i = 0; i < 4; ++i) (*c)->Write(big.data(), big.size(), key, 0, probe.Callback());
  std::this_thread::sleep_for(50ms);
  kill(child, SIGKILL);
  int wstatus = 0;
  waitpid(child, &wstatus, 0);
  auto t0 = std::chrono::steady_clock::now();
  ASSERT_TRUE(probe.WaitFor(4, 15s)) << "pending writes did not complete after the peer died";
  // The death is reported as an error close within the bound. (Whether the writes already in
  // flight fail depends on the wire: over tcp they do; over shared memory a one-sided write
  // into the dead peer's still-mapped segment completes.)
  ASSERT_TRUE(inbox.WaitCloses(1, 15s)) << "the connection did not report the peer's death";
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 15s);
  if (GetParam().backend == "tcp") {
    bool any_failed = false;
    for (auto& st : probe.statuses()) any_failed |= !st.ok();
    EXPECT_TRUE(any_failed);
  }
  // Nothing new goes through.
  Probe after;
  (*c)->Write(big.data(), 64, key, 0, after.Callback());
  ASSERT_TRUE(after.WaitFor(1));
  EXPECT_FALSE(after.statuses()[0].ok());
}

std::vector<BackendParam> Backends() {
  // ucx twice: over shared memory (one-sided through mapped segments) and over tcp.
  // Over an RDMA device (skipped without one): the verbs backend, and ucx over rc_verbs (its
  // wire-up over ud_verbs; soft-RoCE's UD packets fail UCX 1.13's destination-GID check, hence
  // UCX_UD_ETH_DGID_CHECK=n, docs/transports.md).
  std::vector<BackendParam> v = {
      {"tcp", "tcp", {}},
      {"ucx_shm", "ucx", {{"UCX_TLS", "shm,self"}}},
      {"ucx_tcp", "ucx", {{"UCX_TLS", "tcp,self"}}},
      {"verbs", "verbs", {}, "", true},
      {"ucx_rc",
       "ucx",
       {{"UCX_TLS", "rc_verbs,ud_verbs,self"}, {"UCX_UD_ETH_DGID_CHECK", "n"}},
       "",
       true},
      {"ucx_ud", "ucx", {{"UCX_TLS", "ud_verbs,self"}, {"UCX_UD_ETH_DGID_CHECK", "n"}}, "", true}};
  return v;
}

INSTANTIATE_TEST_SUITE_P(Backends, TransportConformance, ::testing::ValuesIn(Backends()),
                         ParamName);

}  // namespace
}  // namespace shardps::transport
