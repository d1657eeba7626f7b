// Test certificates made with the openssl command (Debian's openssl): a cluster CA and a node
// certificate it signs, and a second CA with its own node (a stranger), in a temporary folder.
#pragma once

#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <string>

#include "core/subprocess.h"

namespace shardps::testing {

struct TestCerts {
  std::string dir;
  std::string ca, cert, key;                    // the cluster's
  std::string other_ca, other_cert, other_key;  // another CA's node
  bool ok = false;
  std::string error;

  static TestCerts Make() {
    using namespace std::chrono_literals;
    TestCerts c;
    c.dir = (std::filesystem::temp_directory_path() /
             ("shardps-tls-" + std::to_string(getpid()) + "-" + std::to_string(rand())))
                .string();
    std::filesystem::create_directories(c.dir);
    const std::string script = R"(set -e
cd ")" + c.dir + R"("
for who in ca other-ca; do
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -keyout $who.key -out $who.pem -subj "/CN=shardps test $who" 2>/dev/null
done
for pair in node:ca other:other-ca; do
  n=${pair%%:*}; ca=${pair#*:}
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
    -keyout $n.key -out $n.csr -subj "/CN=shardps $n" 2>/dev/null
  openssl x509 -req -in $n.csr -CA $ca.pem -CAkey $ca.key -CAcreateserial -days 2 \
    -out $n.pem 2>/dev/null
done
chmod 600 *.key
)";
    auto r = RunCommand({"sh", "-c", script}, 60s);
    c.ok = r.exit_code == 0 && !r.timed_out;
    c.error = r.output;
    c.ca = c.dir + "/ca.pem";
    c.cert = c.dir + "/node.pem";
    c.key = c.dir + "/node.key";
    c.other_ca = c.dir + "/other-ca.pem";
    c.other_cert = c.dir + "/other.pem";
    c.other_key = c.dir + "/other.key";
    return c;
  }
  void Remove() const { std::filesystem::remove_all(dir); }
};

}  // namespace shardps::testing
