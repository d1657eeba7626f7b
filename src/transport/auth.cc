#include "transport/auth.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/rand.h>

#include <cstring>

namespace shardps::transport::auth {
namespace {

constexpr uint8_t kMagic[kMagicBytes] = {'S', 'P', 'S', 'A', 'U', 'T', 'H', '1'};
constexpr std::string_view kConnectorLabel = "shardps-auth-v1 connector";
constexpr std::string_view kAcceptorLabel = "shardps-auth-v1 acceptor";

}  // namespace

Status NewNonce(Nonce* out) {
  if (RAND_bytes(out->data(), static_cast<int>(out->size())) != 1)
    return Status::Internal("OpenSSL's random generator gave no nonce");
  return Status::OK();
}

uint64_t RandomId() {
  uint64_t v = 0;
  if (RAND_bytes(reinterpret_cast<unsigned char*>(&v), sizeof(v)) != 1) return 0;
  return v;
}

Hello MakeHello(const Nonce& nonce) {
  Hello h{};
  std::memcpy(h.data(), kMagic, kMagicBytes);
  std::memcpy(h.data() + kMagicBytes, nonce.data(), kNonceBytes);
  return h;
}

Status ParseHello(const uint8_t* bytes, Nonce* nonce) {
  if (std::memcmp(bytes, kMagic, kMagicBytes) != 0)
    return Status::ProtocolError(
        "the peer sent no authentication hello (a peer without the cluster secret, or not "
        "ShardPS)");
  std::memcpy(nonce->data(), bytes + kMagicBytes, kNonceBytes);
  return Status::OK();
}

bool CouldBeHello(const uint8_t* bytes, size_t n) {
  return std::memcmp(bytes, kMagic, n < kMagicBytes ? n : kMagicBytes) == 0;
}

Proof MakeProof(std::string_view secret, Side side, const Nonce& acceptor, const Nonce& connector) {
  std::string_view label = side == Side::kConnector ? kConnectorLabel : kAcceptorLabel;
  uint8_t msg[64 + 2 * kNonceBytes];
  std::memcpy(msg, label.data(), label.size());
  std::memcpy(msg + label.size(), acceptor.data(), kNonceBytes);
  std::memcpy(msg + label.size() + kNonceBytes, connector.data(), kNonceBytes);
  Proof p{};
  unsigned int len = 0;
  HMAC(EVP_sha256(), secret.data(), static_cast<int>(secret.size()), msg,
       label.size() + 2 * kNonceBytes, p.data(), &len);
  return p;
}

bool ProofMatches(const Proof& expected, const uint8_t* received) {
  return CRYPTO_memcmp(expected.data(), received, kProofBytes) == 0;
}

}  // namespace shardps::transport::auth
