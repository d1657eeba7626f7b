#include "train/plot.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <system_error>

#include <fmt/format.h>

extern char** environ;

namespace shardps::train {
namespace {

// A gnuplot single-quoted string literal (inside one, only ' needs escaping, as '').
std::string Quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) {
    if (c == '\'') q += '\'';
    if (c != '\n' && c != '\r') q += c;
  }
  return q + "'";
}

std::string DataBlock(const std::string& name, const std::vector<EpochPoint>& points) {
  std::string block = fmt::format("${} << EOD\n", name);
  const auto num = [](double v) { return std::isfinite(v) ? fmt::format("{:.9g}", v) : "NaN"; };
  for (const EpochPoint& p : points) {
    block += fmt::format("{} {} {}\n", p.epoch, num(p.train_loss), num(p.test_accuracy));
  }
  return block + "EOD\n";
}

std::string Script(const std::string& png_path, const std::vector<EpochPoint>& run,
                   const std::vector<EpochPoint>& baseline, const std::string& title) {
  std::string s = DataBlock("RUN", run);
  if (!baseline.empty()) s += DataBlock("BASE", baseline);
  s += R"(if (strstrt(GPVAL_TERMINALS, "pngcairo") > 0) {
  set terminal pngcairo size 1000,450 noenhanced
} else {
  set terminal png size 1000,450 noenhanced
}
)";
  s += fmt::format("set output {}\n", Quote(png_path));
  s += fmt::format("set multiplot layout 1,2 title {}\n", Quote(title));
  s += "set grid\nset xlabel 'epoch'\nset format x '%g'\n";
  const auto panel = [&](const char* ylabel, int column, const char* key) {
    std::string p = fmt::format(
        "set key {}\nset ylabel '{}'\n"
        "plot $RUN using 1:{} with linespoints lw 2 pt 7 title 'run'",
        key, ylabel, column);
    if (!baseline.empty()) {
      p += fmt::format(", $BASE using 1:{} with linespoints lw 2 pt 5 dt 2 title 'baseline'",
                       column);
    }
    return p + "\n";
  };
  s += panel("training loss", 2, "top right");
  s += panel("test accuracy", 3, "bottom right");
  return s + "unset multiplot\nset output\n";
}

// gnuplot's messages for an error report: printable text only, at most ~2000 characters.
std::string Printable(const std::string& output) {
  std::string s;
  for (char c : output) {
    if (c == '\n' || (c >= 0x20 && c < 0x7f)) s += c;
  }
  if (s.size() > 2000) s = "..." + s.substr(s.size() - 2000);
  return s;
}

// Runs `gnuplot` on `script` (fed through stdin); stdout and stderr are collected in `output`.
Status RunGnuplot(const std::string& gnuplot, const std::string& script, std::string* output) {
  // stdin is a socket so that a gnuplot that exits early gives EPIPE (send with MSG_NOSIGNAL)
  // rather than a SIGPIPE that would kill this process.
  int in[2], out[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, in) != 0) {
    return Status::FromErrno("socketpair", errno);
  }
  if (::pipe2(out, O_CLOEXEC) != 0) {
    const int err = errno;
    ::close(in[0]);
    ::close(in[1]);
    return Status::FromErrno("pipe", err);
  }
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, in[0], STDIN_FILENO);
  posix_spawn_file_actions_adddup2(&actions, out[1], STDOUT_FILENO);
  posix_spawn_file_actions_adddup2(&actions, out[1], STDERR_FILENO);
  char arg0[] = "gnuplot";
  char* argv[] = {arg0, nullptr};
  pid_t pid = -1;
  // posix_spawnp looks gnuplot up on PATH itself.
  const int rc = posix_spawnp(&pid, gnuplot.c_str(), &actions, nullptr, argv, environ);
  posix_spawn_file_actions_destroy(&actions);
  ::close(in[0]);
  ::close(out[1]);
  if (rc != 0) {
    ::close(in[1]);
    ::close(out[0]);
    if (rc == ENOENT) return Status::NotFound("gnuplot not found: apt-get install gnuplot-nox");
    return Status::FromErrno(fmt::format("spawn {}", gnuplot), rc);
  }
  // gnuplot reads the script as it goes and prints little, so writing all of it before reading
  // the output cannot deadlock.
  Status write_status;
  for (size_t done = 0; done < script.size();) {
    const ssize_t n = ::send(in[1], script.data() + done, script.size() - done, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) {
      write_status = Status::FromErrno("write to gnuplot", errno);
      break;
    }
    done += static_cast<size_t>(n);
  }
  ::close(in[1]);
  char buf[4096];
  for (;;) {
    const ssize_t n = ::read(out[0], buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) break;
    output->append(buf, static_cast<size_t>(n));
  }
  ::close(out[0]);
  int wstatus = 0;
  while (::waitpid(pid, &wstatus, 0) < 0) {
    if (errno != EINTR) return Status::FromErrno("waitpid gnuplot", errno);
  }
  if (!WIFEXITED(wstatus) || WEXITSTATUS(wstatus) != 0) {
    return Status::IOError(fmt::format(
        "gnuplot failed ({} {}): {}", WIFEXITED(wstatus) ? "exit status" : "signal",
        WIFEXITED(wstatus) ? WEXITSTATUS(wstatus) : WTERMSIG(wstatus), Printable(*output)));
  }
  return write_status;
}

}  // namespace

Status DrawPng(const std::string& png_path, const std::string& script) {
  const std::string gnuplot = "gnuplot";
  std::error_code ec;
  const std::filesystem::path parent = std::filesystem::path(png_path).parent_path();
  if (!parent.empty() && !std::filesystem::is_directory(parent, ec)) {
    return Status::IOError(
        fmt::format("cannot write {}: directory {} does not exist", png_path, parent.string()));
  }
  std::filesystem::remove(png_path, ec);  // so a stale file cannot pass the check below
  std::string output;
  SHARDPS_RETURN_IF_ERROR(
      RunGnuplot(gnuplot, script, &output).WithContext(fmt::format("plotting {}", png_path)));
  const auto size = std::filesystem::file_size(png_path, ec);
  if (ec || size == 0) {
    return Status::IOError(fmt::format("gnuplot wrote no file {}{}{}", png_path,
                                       output.empty() ? "" : ": ", Printable(output)));
  }
  return Status::OK();
}

std::string GnuplotQuote(const std::string& s) { return Quote(s); }

Status WritePlot(const std::string& png_path, const std::vector<EpochPoint>& run,
                 const std::vector<EpochPoint>& baseline, const std::string& title) {
  if (run.empty()) return Status::InvalidArgument("WritePlot: the run has no epochs to plot");
  return DrawPng(png_path, Script(png_path, run, baseline, title));
}

}  // namespace shardps::train
