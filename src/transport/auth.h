// Mutual challenge-response on a new connection, before any frame (docs/security.md).
//
// Both ends know the cluster secret K. Each sends a hello: the 8 bytes "SPSAUTH1" and a fresh
// 32-byte random nonce. The connecting side then proves K with
//   HMAC-SHA256(K, "shardps-auth-v1 connector" || nonce_acceptor || nonce_connector)
// and the accepting side, once that proof checked, answers with the same over
// "shardps-auth-v1 acceptor". The acceptor's nonce is new for each connection, so a recorded
// proof is worth nothing on another one (replay); the labels differ, so neither side's proof
// can be reflected back as the other's. Only then does either side read a frame.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "shardps/status.h"

namespace shardps::transport::auth {

inline constexpr size_t kNonceBytes = 32;
inline constexpr size_t kProofBytes = 32;  // HMAC-SHA256
inline constexpr size_t kMagicBytes = 8;
inline constexpr size_t kHelloBytes = kMagicBytes + kNonceBytes;

using Nonce = std::array<uint8_t, kNonceBytes>;
using Proof = std::array<uint8_t, kProofBytes>;
using Hello = std::array<uint8_t, kHelloBytes>;

enum class Side { kConnector, kAcceptor };

// A fresh nonce from OpenSSL's generator; Internal when it cannot give one.
Status NewNonce(Nonce* out);
// 64 random bits from the same generator (identifiers a peer must not guess); 0 when it fails.
uint64_t RandomId();
Hello MakeHello(const Nonce& nonce);
// The nonce of a peer's hello; ProtocolError when it is not one (a peer without the secret
// speaking frames, or anything else).
Status ParseHello(const uint8_t* bytes, Nonce* nonce);
// Whether the first n bytes received can still be a hello (n may be less than kHelloBytes), so a
// peer speaking frames is refused at its first bytes.
bool CouldBeHello(const uint8_t* bytes, size_t n);
// What `side` sends to prove the secret on the connection with these two nonces.
Proof MakeProof(std::string_view secret, Side side, const Nonce& acceptor, const Nonce& connector);
// Constant-time comparison of a received proof with the expected one.
bool ProofMatches(const Proof& expected, const uint8_t* received);

}  // namespace shardps::transport::auth
