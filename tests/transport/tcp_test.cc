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
