// Frames from the network: every input goes through the frame header decoder, then is sent as
// a peer's whole byte stream to a real tcp context (a listener that answers messages, with a
// registered region for one-sided requests), which must survive it: no crash, no read out of
// bounds, memory within the inbound budget. The 16 bytes "@@SHARDPS-KEY@@@" in an input are
// replaced by the region's packed key (its id and random secret), so that inputs can reach the
// one-sided write and read paths, not only their refusals.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "transport/context.h"
#include "transport/frame.h"

namespace {

using namespace shardps;
using namespace shardps::transport;

constexpr char kKeyMarker[] = "@@SHARDPS-KEY@@@";

class Harness {
 public:
  Harness() {
    ContextOptions o;
    o.name = "fuzz";
    o.max_meta_bytes = 1 << 20;
    o.max_payload_bytes = 16 << 20;
    o.connection_inbound_bytes = 4 << 20;
    o.inbound_budget = budget_;
    o.max_send_queue_bytes = 1 << 20;
    auto ctx = CreateContext("tcp", o);
    if (!ctx.ok()) std::abort();
    ctx_ = std::move(ctx).value();
    auto region = ctx_->AllocateRegion(4096);
    if (!region.ok()) std::abort();
    region_ = std::move(region).value();
    ConnectionHandlers h;
    h.on_message = [](const std::shared_ptr<Connection>& c, Message m) {
      c->Send(m.tag, std::move(m.meta), Payload{}, nullptr);
    };
    auto l = ctx_->Listen("127.0.0.1:0", [h](const std::shared_ptr<Connection>&) { return h; });
    if (!l.ok()) std::abort();
    listener_ = std::move(l).value();
    std::string host;
    if (!ParseHostPort(listener_->address(), &host, &port_).ok()) std::abort();
  }

  // Sends `data` as one connection's byte stream, then reads the answers until the context
  // closes the connection or 2 s passed.
  void Feed(const uint8_t* data, size_t size) {
    std::vector<uint8_t> in(data, data + size);
    const Bytes& key = region_->remote_key().packed;
    for (size_t i = 0; i + 16 <= in.size(); ++i)
      if (std::memcmp(in.data() + i, kKeyMarker, 16) == 0 && key.size() == 16)
        std::memcpy(in.data() + i, key.data(), 16);
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    if (fd < 0) Die("socket");
    // Each input connects from the next of 1024 loopback source addresses (127.2.x.y): this
    // side closes first and keeps a TIME_WAIT socket for a minute, and at thousands of inputs a
    // second one address's ephemeral ports would run out.
    sockaddr_in src{};
    src.sin_family = AF_INET;
    uint32_t n = next_source_++ % 1024;
    src.sin_addr.s_addr = htonl((127u << 24) | (2u << 16) | ((n / 250) << 8) | (n % 250 + 1));
    if (bind(fd, reinterpret_cast<sockaddr*>(&src), sizeof(src)) != 0) Die("bind");
    sockaddr_in a{};
    a.sin_family = AF_INET;
    a.sin_port = htons(port_);
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    if (connect(fd, reinterpret_cast<sockaddr*>(&a), sizeof(a)) != 0) {
      // libFuzzer's timer signal may interrupt connect(); the connection then completes in the
      // background (a CI run died here with EINTR): wait for it and read its result.
      if (errno != EINTR) Die("connect");
      pollfd p{fd, POLLOUT, 0};
      int r = 0;
      for (int i = 0; i < 100 && (r = poll(&p, 1, 100)) <= 0; ++i)
        if (r < 0 && errno != EINTR) Die("poll after an interrupted connect");
      int err = 0;
      socklen_t len = sizeof(err);
      if (r <= 0 || getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0) {
        if (err != 0) errno = err;
        Die("connect (after EINTR)");
      }
    }
    size_t sent = 0;
    char sink[65536];
    while (sent < in.size()) {
      pollfd p{fd, POLLOUT | POLLIN, 0};
      if (poll(&p, 1, 2000) <= 0) break;
      if (p.revents & POLLIN) {
        if (recv(fd, sink, sizeof(sink), 0) <= 0) break;
      }
      if (p.revents & POLLOUT) {
        ssize_t n = send(fd, in.data() + sent, in.size() - sent, MSG_NOSIGNAL);
        if (n <= 0) break;
        sent += static_cast<size_t>(n);
      }
      if (p.revents & (POLLERR | POLLHUP)) break;
    }
    shutdown(fd, SHUT_WR);
    for (;;) {
      pollfd p{fd, POLLIN, 0};
      if (poll(&p, 1, 2000) <= 0) break;
      if (recv(fd, sink, sizeof(sink), 0) <= 0) break;
    }
    close(fd);
    if (budget_->peak() > budget_->limit()) {
      std::fprintf(stderr, "fuzz_frame: inbound budget exceeded: peak %llu > limit %llu\n",
                   static_cast<unsigned long long>(budget_->peak()),
                   static_cast<unsigned long long>(budget_->limit()));
      std::abort();
    }
  }

 private:
  // A failure of the harness itself (not of the code under test), said as such.
  [[noreturn]] static void Die(const char* what) {
    std::fprintf(stderr, "fuzz_frame harness: %s failed: %s\n", what, std::strerror(errno));
    std::abort();
  }

  std::shared_ptr<InboundBudget> budget_ = std::make_shared<InboundBudget>(8 << 20);
  std::unique_ptr<Context> ctx_;
  std::unique_ptr<MemoryRegion> region_;
  std::unique_ptr<Listener> listener_;
  uint16_t port_ = 0;
  uint32_t next_source_ = 0;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size >= kFrameHeaderSize) {
    FrameHeader h;
    (void)h.DecodeFrom(data, 1 << 20, 16 << 20);
  }
  // One context for the whole run, leaked on purpose: the fuzzer exits without destructors.
  static Harness* harness = new Harness();
  harness->Feed(data, size);
  return 0;
}
