// The cluster secret on the transport (transport/auth.h, docs/security.md): peers holding it
// talk; a peer with another secret, none at all, a replayed handshake or silence is refused,
// and the listener serves everyone else on. Over every backend built.
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <mutex>
#include <thread>

#include <gtest/gtest.h>

#include "support/auth_peers.h"
#include "transport/auth.h"
#include "transport/context.h"
#include "transport/frame.h"

namespace shardps::transport {
namespace {

using namespace std::chrono_literals;
using shardps::testing::BytesUntilClosed;
using shardps::testing::RawConnect;
using shardps::testing::RecordHandshake;
using shardps::testing::RecvAll;
using shardps::testing::ReplayIsRefused;
using shardps::testing::SendAll;

constexpr char kSecret[] = "0123456789abcdef0123456789abcdef";

TEST(AuthMath, ProofsDependOnSecretSideAndBothNonces) {
  auth::Nonce a{}, c{};
  ASSERT_TRUE(auth::NewNonce(&a).ok());
  ASSERT_TRUE(auth::NewNonce(&c).ok());
  EXPECT_NE(a, c);
  auto p = auth::MakeProof(kSecret, auth::Side::kConnector, a, c);
  EXPECT_TRUE(auth::ProofMatches(p, auth::MakeProof(kSecret, auth::Side::kConnector, a, c).data()));
  EXPECT_FALSE(auth::ProofMatches(p, auth::MakeProof(kSecret, auth::Side::kAcceptor, a, c).data()));
  EXPECT_FALSE(auth::ProofMatches(
      p, auth::MakeProof("another secret!!", auth::Side::kConnector, a, c).data()));
  EXPECT_FALSE(
      auth::ProofMatches(p, auth::MakeProof(kSecret, auth::Side::kConnector, c, a).data()));
  auth::Hello h = auth::MakeHello(a);
  auth::Nonce back{};
  ASSERT_TRUE(auth::ParseHello(h.data(), &back).ok());
  EXPECT_EQ(back, a);
  h[0] ^= 1;
  EXPECT_EQ(auth::ParseHello(h.data(), &back).code(), Status::Code::kProtocolError);
  EXPECT_FALSE(auth::CouldBeHello(h.data(), 1));
  EXPECT_TRUE(auth::CouldBeHello(auth::MakeHello(a).data(), 3));
}

// A listener with the secret that echoes every message and counts the connections it accepted.
class AuthOver : public ::testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    if (!CheckViability(GetParam()).viable) GTEST_SKIP() << CheckViability(GetParam()).reason;
    ContextOptions o;
    o.name = "auth-server";
    o.secret = kSecret;
    o.auth_timeout = 500ms;
    auto ctx = CreateContext(GetParam(), o);
    ASSERT_TRUE(ctx.ok()) << ctx.status().ToString();
    server_ = std::move(ctx).value();
    auto l = server_->Listen("127.0.0.1:0", [this](const std::shared_ptr<Connection>&) {
      accepted_++;
      ConnectionHandlers h;
      h.on_message = [](const std::shared_ptr<Connection>& c, Message m) {
        c->Send(m.tag + 1, std::move(m.meta), Payload(), nullptr);
      };
      return h;
    });
    ASSERT_TRUE(l.ok()) << l.status().ToString();
    listener_ = std::move(l).value();
  }

  std::unique_ptr<Context> Client(const std::string& secret) {
    ContextOptions o;
    o.name = "auth-client";
    o.secret = secret;
    o.auth_timeout = 2s;
    auto ctx = CreateContext(GetParam(), o);
    EXPECT_TRUE(ctx.ok()) << ctx.status().ToString();
    return ctx.ok() ? std::move(ctx).value() : nullptr;
  }

  // Sends one message from a client holding the secret and waits for the echo.
  void EchoWorks() {
    auto client = Client(kSecret);
    ASSERT_TRUE(client);
    std::mutex mu;
    std::condition_variable cv;
    uint32_t got = 0;
    ConnectionHandlers h;
    h.on_message = [&](const std::shared_ptr<Connection>&, Message m) {
      std::lock_guard<std::mutex> lock(mu);
      got = m.tag;
      cv.notify_all();
    };
    auto c = client->Connect(listener_->address(), h, 5s);
    ASSERT_TRUE(c.ok()) << c.status().ToString();
    (*c)->Send(41, Bytes{1, 2, 3}, Payload(), nullptr);
    std::unique_lock<std::mutex> lock(mu);
    ASSERT_TRUE(cv.wait_for(lock, 10s, [&] { return got != 0; }));
    EXPECT_EQ(got, 42u);
  }

  std::unique_ptr<Context> server_;
  std::unique_ptr<Listener> listener_;
  std::atomic<int> accepted_{0};
};

TEST_P(AuthOver, PeersHoldingTheSecretTalk) {
  EchoWorks();
  EchoWorks();
  EXPECT_EQ(accepted_.load(), 2);
  EXPECT_EQ(shardps::testing::RefusedReaching(*server_, 0), 0u);
}

TEST_P(AuthOver, AnotherSecretIsRefusedAndNothingIsAccepted) {
  auto client = Client("not the cluster secret");
  ASSERT_TRUE(client);
  auto c = client->Connect(listener_->address(), {}, 5s);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), Status::Code::kUnauthenticated) << c.status().ToString();
  EXPECT_EQ(shardps::testing::RefusedReaching(*server_, 1), 1u);
  EXPECT_EQ(accepted_.load(), 0);
  EchoWorks();  // the listener serves on
}

TEST_P(AuthOver, APeerWithoutTheSecretIsClosedAtItsFirstFrame) {
  int fd = RawConnect(listener_->address());
  ASSERT_GE(fd, 0);
  uint8_t hdr[kFrameHeaderSize];
  FrameHeader h;
  h.meta_len = 3;
  h.aux = 7;
  h.EncodeTo(hdr);
  ASSERT_TRUE(SendAll(fd, hdr, sizeof(hdr)));
  // It sees the server's hello, then the close; never an answer to its frame.
  EXPECT_EQ(BytesUntilClosed(fd), static_cast<int64_t>(auth::kHelloBytes));
  close(fd);
  // A client context without a secret: its connection is closed before any message.
  auto client = Client("");
  ASSERT_TRUE(client);
  std::atomic<bool> closed{false}, answered{false};
  ConnectionHandlers ch;
  ch.on_message = [&](const std::shared_ptr<Connection>&, Message) { answered = true; };
  ch.on_close = [&](const std::shared_ptr<Connection>&, Status) { closed = true; };
  auto c = client->Connect(listener_->address(), ch, 5s);
  if (c.ok()) {  // tcp connects at once (ucx's wire-up fails there already)
    (*c)->Send(41, Bytes{1}, Payload(), nullptr);
    for (auto deadline = std::chrono::steady_clock::now() + 10s;
         !closed.load() && std::chrono::steady_clock::now() < deadline;)
      std::this_thread::sleep_for(5ms);
    EXPECT_TRUE(closed.load());
  }
  EXPECT_FALSE(answered.load());
  EXPECT_EQ(accepted_.load(), 0);
  EXPECT_EQ(shardps::testing::RefusedReaching(*server_, 2), 2u);
  EchoWorks();
}

TEST_P(AuthOver, AReplayedHandshakeIsRefused) {
  auto recorded = RecordHandshake(listener_->address(), kSecret);
  ASSERT_EQ(recorded.size(), auth::kHelloBytes + auth::kProofBytes);
  // The relayed one was genuine (the server hands it on just after sending its proof).
  for (auto deadline = std::chrono::steady_clock::now() + 10s;
       accepted_.load() < 1 && std::chrono::steady_clock::now() < deadline;)
    std::this_thread::sleep_for(5ms);
  EXPECT_EQ(accepted_.load(), 1);
  EXPECT_TRUE(ReplayIsRefused(listener_->address(), recorded));
  EXPECT_TRUE(ReplayIsRefused(listener_->address(), recorded));
  EXPECT_EQ(accepted_.load(), 1);
  EXPECT_EQ(shardps::testing::RefusedReaching(*server_, 2), 2u);
  EchoWorks();
}

TEST_P(AuthOver, ASilentPeerIsClosedAfterTheAuthTimeout) {
  int fd = RawConnect(listener_->address());
  ASSERT_GE(fd, 0);
  uint8_t hello[auth::kHelloBytes];
  ASSERT_TRUE(RecvAll(fd, hello, sizeof(hello)));
  auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(BytesUntilClosed(fd, 10000), 0);  // closed by the 500 ms timer, not by us
  EXPECT_GE(std::chrono::steady_clock::now() - start, 400ms);
  close(fd);
  EXPECT_EQ(shardps::testing::RefusedReaching(*server_, 1), 1u);
  EchoWorks();
}

TEST_P(AuthOver, AServerWithoutTheSecretIsNotTrusted) {
  ContextOptions o;
  o.name = "open-server";
  auto open = CreateContext(GetParam(), o);
  ASSERT_TRUE(open.ok());
  auto l = (*open)->Listen("127.0.0.1:0",
                           [](const std::shared_ptr<Connection>&) { return ConnectionHandlers{}; });
  ASSERT_TRUE(l.ok());
  auto client = Client(kSecret);
  ASSERT_TRUE(client);
  auto c = client->Connect((*l)->address(), {}, 5s);
  ASSERT_FALSE(c.ok());
  EXPECT_TRUE(c.status().code() == Status::Code::kUnauthenticated ||
              c.status().code() == Status::Code::kTimeout)
      << c.status().ToString();
}

// A close while handshakes are pending, and a listener destroyed with some: nothing leaks or
// hangs (the sanitizer builds run this too).
TEST_P(AuthOver, PendingHandshakesEndWithTheirListener) {
  std::vector<int> fds;
  for (int i = 0; i < 8; ++i) fds.push_back(RawConnect(listener_->address()));
  for (int fd : fds) {
    uint8_t hello[auth::kHelloBytes];
    ASSERT_TRUE(RecvAll(fd, hello, sizeof(hello)));
  }
  listener_.reset();
  for (int fd : fds) {
    EXPECT_EQ(BytesUntilClosed(fd, 5000), 0);
    close(fd);
  }
  EXPECT_EQ(accepted_.load(), 0);
}

INSTANTIATE_TEST_SUITE_P(Backends, AuthOver, ::testing::ValuesIn(BackendNames()),
                         [](const auto& info) { return info.param; });

}  // namespace
}  // namespace shardps::transport
