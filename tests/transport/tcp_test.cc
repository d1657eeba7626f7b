// tcp-specific checks: malformed frames from a raw socket close that one connection, and the
// listener keeps serving everyone else.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <condition_variable>
#include <cstring>
#include <mutex>
#include <thread>
#include <vector>

#include <gtest/gtest.h>

#include "transport/context.h"
#include "transport/frame.h"

namespace shardps::transport {
namespace {

using namespace std::chrono_literals;

int RawConnect(const std::string& address) {
  std::string host;
  uint16_t port = 0;
  EXPECT_TRUE(ParseHostPort(address, &host, &port).ok());
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_port = htons(port);
  inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
  EXPECT_EQ(connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)), 0);
  return fd;
}

// True when the peer closed the socket within the timeout.
bool ClosedByPeer(int fd, int timeout_ms = 5000) {
  char buf[256];
  for (;;) {
    pollfd p{fd, POLLIN, 0};
    if (poll(&p, 1, timeout_ms) <= 0) return false;
    ssize_t n = recv(fd, buf, sizeof(buf), 0);
    if (n <= 0) return true;
  }
}

class TcpMalformed : public ::testing::Test {
 protected:
  void SetUp() override {
    ContextOptions o;
    o.max_payload_bytes = 1 << 20;
    o.max_meta_bytes = 4096;
    auto ctx = CreateContext("tcp", o);
    ASSERT_TRUE(ctx.ok());
    ctx_ = std::move(ctx).value();
    ConnectionHandlers h;
    h.on_message = [this](const std::shared_ptr<Connection>& c, Message m) {
      std::lock_guard<std::mutex> lock(mu_);
      ++messages_;
      cv_.notify_all();
      c->Send(m.tag, {}, Payload{}, nullptr);
    };
    auto l = ctx_->Listen("127.0.0.1:0", [h](const std::shared_ptr<Connection>&) { return h; });
    ASSERT_TRUE(l.ok());
    listener_ = std::move(l).value();
  }
  void ExpectStillServing() {
    int fd = RawConnect(listener_->address());
    uint8_t hdr[kFrameHeaderSize];
    FrameHeader h;
    h.type = FrameType::kMessage;
    h.aux = 9;
    h.EncodeTo(hdr);
    ASSERT_EQ(send(fd, hdr, sizeof(hdr), 0), static_cast<ssize_t>(sizeof(hdr)));
    uint8_t reply[kFrameHeaderSize];
    size_t got = 0;
    while (got < sizeof(reply)) {
      pollfd p{fd, POLLIN, 0};
      ASSERT_GT(poll(&p, 1, 5000), 0);
      ssize_t n = recv(fd, reply + got, sizeof(reply) - got, 0);
      ASSERT_GT(n, 0);
      got += static_cast<size_t>(n);
    }
    FrameHeader r;
    ASSERT_TRUE(r.DecodeFrom(reply, 4096, 1 << 20).ok());
    EXPECT_EQ(r.aux, 9u);
    close(fd);
  }
  std::unique_ptr<Context> ctx_;
  std::unique_ptr<Listener> listener_;
  std::mutex mu_;
  std::condition_variable cv_;
  int messages_ = 0;
};

TEST_F(TcpMalformed, GarbageClosesOnlyThatConnection) {
  int fd = RawConnect(listener_->address());
  const char junk[] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n.....";
  ASSERT_GT(send(fd, junk, sizeof(junk), 0), 0);
  EXPECT_TRUE(ClosedByPeer(fd));
  close(fd);
  ExpectStillServing();
}

TEST_F(TcpMalformed, WrongVersionOrTypeCloses) {
  for (int variant = 0; variant < 2; ++variant) {
    int fd = RawConnect(listener_->address());
    uint8_t hdr[kFrameHeaderSize];
    FrameHeader h;
    h.EncodeTo(hdr);
    if (variant == 0) hdr[4] = 99;  // version
    if (variant == 1) hdr[5] = 77;  // type
    ASSERT_EQ(send(fd, hdr, sizeof(hdr), 0), static_cast<ssize_t>(sizeof(hdr)));
    EXPECT_TRUE(ClosedByPeer(fd)) << "variant " << variant;
    close(fd);
  }
  ExpectStillServing();
}

TEST_F(TcpMalformed, OversizedFrameCloses) {
  int fd = RawConnect(listener_->address());
  uint8_t hdr[kFrameHeaderSize];
  FrameHeader h;
  h.payload_len = 1ull << 40;
  h.EncodeTo(hdr);
  ASSERT_EQ(send(fd, hdr, sizeof(hdr), 0), static_cast<ssize_t>(sizeof(hdr)));
  EXPECT_TRUE(ClosedByPeer(fd));
  close(fd);
  ExpectStillServing();
}

TEST_F(TcpMalformed, UnsolicitedResponseAndShortRequestsClose) {
  for (int variant = 0; variant < 2; ++variant) {
    int fd = RawConnect(listener_->address());
    uint8_t buf[kFrameHeaderSize + 8] = {0};
    FrameHeader h;
    h.type = variant == 0 ? FrameType::kWriteResp : FrameType::kReadReq;
    h.request_id = 12345;
    h.meta_len = 8;  // too short for either
    h.EncodeTo(buf);
    ASSERT_EQ(send(fd, buf, sizeof(buf), 0), static_cast<ssize_t>(sizeof(buf)));
    EXPECT_TRUE(ClosedByPeer(fd)) << "variant " << variant;
    close(fd);
  }
  ExpectStillServing();
}

uint64_t ResidentBytes() {
  FILE* f = fopen("/proc/self/statm", "r");
  unsigned long long pages = 0, rss = 0;
  if (f) {
    if (fscanf(f, "%llu %llu", &pages, &rss) != 2) rss = 0;
    fclose(f);
  }
  return rss * static_cast<uint64_t>(sysconf(_SC_PAGESIZE));
}

// A listener on a context whose inbound budget the test holds.
struct BudgetedListener {
  explicit BudgetedListener(uint64_t per_connection, uint64_t per_process) {
    budget = std::make_shared<InboundBudget>(per_process);
    ContextOptions o;
    o.connection_inbound_bytes = per_connection;
    o.inbound_budget = budget;
    auto c = CreateContext("tcp", o);
    EXPECT_TRUE(c.ok());
    ctx = std::move(c).value();
    ConnectionHandlers h;
    h.on_message = [this](const std::shared_ptr<Connection>& c, Message m) {
      std::lock_guard<std::mutex> lock(mu);
      delivered.push_back(m.payload.size());
      cv.notify_all();
      c->Send(m.tag, {}, Payload{}, nullptr);
    };
    h.on_close = [this](const std::shared_ptr<Connection>&, Status st) {
      std::lock_guard<std::mutex> lock(mu);
      if (st.IsProtocolError()) closed_for.push_back(st.message());
      cv.notify_all();
    };
    auto l = ctx->Listen("127.0.0.1:0", [h](const std::shared_ptr<Connection>&) { return h; });
    EXPECT_TRUE(l.ok());
    listener = std::move(l).value();
  }
  // The context goes first: its connections' handlers use the members below until then.
  ~BudgetedListener() {
    listener.reset();
    ctx.reset();
  }
  std::shared_ptr<InboundBudget> budget;
  std::mutex mu;
  std::condition_variable cv;
  std::vector<size_t> delivered;
  std::vector<std::string> closed_for;
  std::unique_ptr<Context> ctx;
  std::unique_ptr<Listener> listener;
};

// Sends a message frame header claiming meta_len and payload_len, then `body` bytes of it.
void SendClaim(int fd, uint32_t meta_len, uint64_t payload_len, size_t body) {
  std::vector<uint8_t> buf(kFrameHeaderSize + body, 0x5a);
  FrameHeader h;
  h.type = FrameType::kMessage;
  h.aux = 7;
  h.meta_len = meta_len;
  h.payload_len = payload_len;
  h.EncodeTo(buf.data());
  size_t sent = 0;
  while (sent < buf.size()) {
    ssize_t n = send(fd, buf.data() + sent, buf.size() - sent, MSG_NOSIGNAL);
    if (n <= 0) return;  // closed by the peer meanwhile
    sent += static_cast<size_t>(n);
  }
}

// Regression (a peer can make a server allocate what it claims, not what it sends): 40
// connections each sent one frame header claiming 60 MiB of metadata and a 2 GiB payload,
// followed by 4 KiB of bytes, and the server's resident memory grew from 100 MB to 1.8 GB.
// Inbound buffers now grow with the bytes received: the 40 frames hold a few KiB each.
TEST(TcpBudget, APeerCanMakeAServerAllocateWhatItClaimsNotWhatItSends) {
  BudgetedListener s(256ull << 20, 1ull << 30);
  const uint64_t rss0 = ResidentBytes();
  std::vector<int> fds;
  for (int i = 0; i < 40; ++i) {
    int fd = RawConnect(s.listener->address());
    SendClaim(fd, 60u << 20, 2ull << 30, 4096);
    fds.push_back(fd);
  }
  // Every connection's 4 KiB arrive (the budget then holds them); give them time to.
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (s.budget->used() < 40 * 4096 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(10ms);
  EXPECT_GE(s.budget->used(), 40u * 4096);
  EXPECT_LE(s.budget->used(), 40u * 16384) << "held more than arrived";
  EXPECT_LT(ResidentBytes() - rss0, 64ull << 20);
  {
    std::lock_guard<std::mutex> lock(s.mu);
    EXPECT_TRUE(s.closed_for.empty());  // within budget: nothing to refuse yet
  }
  for (int fd : fds) close(fd);
  // Closed connections give their share back.
  deadline = std::chrono::steady_clock::now() + 10s;
  while (s.budget->used() > 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(10ms);
  EXPECT_EQ(s.budget->used(), 0u);
}

// A connection that sends more than its own budget is closed with a logged reason; one within
// it is served; all of it was charged only while being received.
TEST(TcpBudget, AConnectionPastItsBudgetIsClosedAndTheOthersServed) {
  BudgetedListener s(1 << 20, 64 << 20);
  int big = RawConnect(s.listener->address());
  SendClaim(big, 0, 2 << 20, 2 << 20);  // a real 2 MiB message
  EXPECT_TRUE(ClosedByPeer(big));
  close(big);
  int ok = RawConnect(s.listener->address());
  SendClaim(ok, 0, 512 << 10, 512 << 10);
  {
    std::unique_lock<std::mutex> lock(s.mu);
    ASSERT_TRUE(s.cv.wait_for(lock, 10s, [&] { return !s.delivered.empty(); }));
    EXPECT_EQ(s.delivered[0], 512u << 10);
    ASSERT_EQ(s.closed_for.size(), 1u);
    EXPECT_NE(s.closed_for[0].find("inbound budget"), std::string::npos) << s.closed_for[0];
  }
  close(ok);
  EXPECT_LE(s.budget->peak(), 1u << 20);
}

// Connections that together exceed the process's budget: the one that would pass it is
// closed, the process keeps serving.
TEST(TcpBudget, ConnectionsPastTheProcessBudgetAreClosed) {
  BudgetedListener s(1 << 20, 1 << 20);
  std::vector<int> fds;
  for (int i = 0; i < 4; ++i) {
    int fd = RawConnect(s.listener->address());
    SendClaim(fd, 0, 1 << 20, 400 << 10);  // 400 KiB each of a claimed 1 MiB
    fds.push_back(fd);
  }
  {
    std::unique_lock<std::mutex> lock(s.mu);
    EXPECT_TRUE(s.cv.wait_for(lock, 10s, [&] { return !s.closed_for.empty(); }));
  }
  EXPECT_LE(s.budget->peak(), 1u << 20);
  for (int fd : fds) close(fd);
  auto deadline = std::chrono::steady_clock::now() + 10s;
  while (s.budget->used() > 0 && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(10ms);
  EXPECT_EQ(s.budget->used(), 0u);
  int fd = RawConnect(s.listener->address());
  SendClaim(fd, 0, 100, 100);
  std::unique_lock<std::mutex> lock(s.mu);
  EXPECT_TRUE(s.cv.wait_for(lock, 10s, [&] { return !s.delivered.empty(); }));
  close(fd);
}

// A peer that sends one-sided read requests and never reads the answers: the answers queued to
// it are bounded; past the bound the connection is closed.
TEST(TcpBudget, APeerThatDoesNotReadItsAnswersIsClosed) {
  ContextOptions o;
  o.max_send_queue_bytes = 1 << 20;
  o.socket_buffer_bytes = 64 << 10;
  auto ctx = CreateContext("tcp", o);
  ASSERT_TRUE(ctx.ok());
  auto region = (*ctx)->AllocateRegion(64 << 10);
  ASSERT_TRUE(region.ok());
  std::mutex mu;
  std::condition_variable cv;
  std::string why;
  ConnectionHandlers h;
  h.on_close = [&](const std::shared_ptr<Connection>&, Status st) {
    std::lock_guard<std::mutex> lock(mu);
    why = st.message();
    cv.notify_all();
  };
  auto l = (*ctx)->Listen("127.0.0.1:0", [h](const std::shared_ptr<Connection>&) { return h; });
  ASSERT_TRUE(l.ok());
  int fd = RawConnect((*l)->address());
  // Read requests of the whole region (64 KiB answers fill the socket buffers at once; then
  // the answers' headers pile up in the server's queue), each with a 32-byte metadata section (id,
  // secret, offset, length), sent until the server gives up on us.
  const Bytes& packed = (*region)->remote_key().packed;
  std::vector<uint8_t> req(kFrameHeaderSize + 32);
  FrameHeader fh;
  fh.type = FrameType::kReadReq;
  fh.meta_len = 32;
  std::memcpy(req.data() + kFrameHeaderSize, packed.data(), 16);
  uint64_t off = 0, len = 64 << 10;
  std::memcpy(req.data() + kFrameHeaderSize + 16, &off, 8);
  std::memcpy(req.data() + kFrameHeaderSize + 24, &len, 8);
  bool closed = false;
  int i = 0;
  for (; i < 200000 && !closed; ++i) {
    fh.request_id = static_cast<uint64_t>(i + 1);
    fh.EncodeTo(req.data());
    pollfd p{fd, POLLOUT, 0};
    if (poll(&p, 1, 2000) <= 0 || send(fd, req.data(), req.size(), MSG_NOSIGNAL) <= 0) {
      closed = true;
    }
    std::lock_guard<std::mutex> lock(mu);
    closed = closed || !why.empty();
  }
  std::unique_lock<std::mutex> lock(mu);
  ASSERT_TRUE(cv.wait_for(lock, 10s, [&] { return !why.empty(); })) << "after " << i << " requests";
  EXPECT_NE(why.find("does not read them"), std::string::npos) << why;
  close(fd);
}

TEST(TcpAddress, ParseHostPortRejectsMalformed) {
  std::string host;
  uint16_t port;
  EXPECT_TRUE(ParseHostPort("127.0.0.1:80", &host, &port).ok());
  EXPECT_EQ(port, 80);
  EXPECT_FALSE(ParseHostPort("127.0.0.1", &host, &port).ok());
  EXPECT_FALSE(ParseHostPort("127.0.0.1:99999", &host, &port).ok());
  EXPECT_FALSE(ParseHostPort("127.0.0.1:8x", &host, &port).ok());
  EXPECT_FALSE(ParseHostPort("h:", &host, &port).ok());
}

TEST(TcpConnect, RefusedConnectionTimesOutWithAClearError) {
  auto ctx = CreateContext("tcp", ContextOptions{});
  ASSERT_TRUE(ctx.ok());
  auto t0 = std::chrono::steady_clock::now();
  auto c = (*ctx)->Connect("127.0.0.1:1", ConnectionHandlers{}, 300ms);
  EXPECT_FALSE(c.ok());
  EXPECT_TRUE(c.status().IsUnavailable()) << c.status().ToString();
  EXPECT_LT(std::chrono::steady_clock::now() - t0, 3s);
}

}  // namespace
}  // namespace shardps::transport
