// The versioned frame header of the tcp transport (docs/protocol.md, "Frames").
#pragma once

#include <cstdint>
#include <cstring>
#include <string>

#include "shardps/status.h"

namespace shardps::transport {

inline constexpr uint32_t kFrameMagic = 0x31535053;  // "SPS1" on the wire
inline constexpr uint8_t kFrameVersion = 1;
inline constexpr size_t kFrameHeaderSize = 32;

enum class FrameType : uint8_t {
  kMessage = 1,    // aux = user tag; meta + payload delivered to on_message
  kWriteReq = 2,   // meta = {region id, secret, offset}; payload = bytes to store
  kWriteResp = 3,  // meta = {status code, message}
  kReadReq = 4,    // meta = {region id, secret, offset, length}
  kReadResp = 5,   // meta = {status code, message}; payload = bytes read (empty on error)
  kWriteMsg = 6,   // aux = user tag; meta = {region id, secret, offset, message meta...};
                   // payload = bytes to store; then meta delivered to on_message (no response)
};

struct FrameHeader {
  uint32_t magic = kFrameMagic;
  uint8_t version = kFrameVersion;
  FrameType type = FrameType::kMessage;
  uint16_t flags = 0;
  uint32_t meta_len = 0;
  uint32_t aux = 0;
  uint64_t payload_len = 0;
  uint64_t request_id = 0;

  void EncodeTo(uint8_t* out) const {
    std::memcpy(out + 0, &magic, 4);
    out[4] = version;
    out[5] = static_cast<uint8_t>(type);
    std::memcpy(out + 6, &flags, 2);
    std::memcpy(out + 8, &meta_len, 4);
    std::memcpy(out + 12, &aux, 4);
    std::memcpy(out + 16, &payload_len, 8);
    std::memcpy(out + 24, &request_id, 8);
  }
  // Decodes and validates against the limits. A non-OK status means: close the connection.
  Status DecodeFrom(const uint8_t* in, uint32_t max_meta, uint64_t max_payload) {
    std::memcpy(&magic, in + 0, 4);
    version = in[4];
    uint8_t t = in[5];
    std::memcpy(&flags, in + 6, 2);
    std::memcpy(&meta_len, in + 8, 4);
    std::memcpy(&aux, in + 12, 4);
    std::memcpy(&payload_len, in + 16, 8);
    std::memcpy(&request_id, in + 24, 8);
    if (magic != kFrameMagic) return Status::ProtocolError("bad frame magic");
    if (version != kFrameVersion)
      return Status::ProtocolError("unsupported frame version " + std::to_string(version));
    if (t < 1 || t > 6) return Status::ProtocolError("unknown frame type " + std::to_string(t));
    type = static_cast<FrameType>(t);
    if (meta_len > max_meta)
      return Status::ProtocolError("frame metadata of " + std::to_string(meta_len) +
                                   " bytes exceeds the limit of " + std::to_string(max_meta));
    if (payload_len > max_payload)
      return Status::ProtocolError("frame payload of " + std::to_string(payload_len) +
                                   " bytes exceeds the limit of " + std::to_string(max_payload));
    return Status::OK();
  }
};

}  // namespace shardps::transport
