// ucx-specific: the shared-memory path is truly one-sided. The target process is stopped
// (SIGSTOP: none of its threads runs, so nothing there can serve a request) while this process
// writes into and reads from its registered region; both complete with the right bytes.
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <condition_variable>
#include <cstring>
#include <mutex>

#include <gtest/gtest.h>

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

}  // namespace
}  // namespace shardps::transport
