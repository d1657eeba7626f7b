// Checkpoint files (docs/fault-tolerance.md, "Checkpoints"): each server writes its chunks'
// state into one file of the checkpoint's directory, and the worker that led the checkpoint
// writes the MANIFEST last, with the size and CRC32C of every file. Every file is written under a
// temporary name, fsynced and renamed (and the directory fsynced). Each checkpoint into a
// directory is a new generation whose files have names of their own: until its manifest replaces
// the last one (an atomic rename), the directory still holds the previous checkpoint, whole, and
// a checkpoint interrupted midway is never loaded.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "shardps/status.h"

namespace shardps::server {

// One chunk as a checkpoint holds it.
struct ChunkState {
  std::string tensor;
  uint64_t chunk_id = 0;
  uint64_t offset = 0;  // in the tensor, elements
  uint64_t numel = 0;
  uint64_t version = 0;            // published versions
  uint8_t optimizer = 0;           // OptimizerKind
  uint64_t steps = 0;              // optimizer steps (adam's bias correction)
  std::vector<uint64_t> last_seq;  // per pusher: the last sequence number applied
  std::vector<float> params;       // fp32
  std::vector<float> m, v;         // optimizer state (as the optimizer has it)
  // A new backup's copy only (not in checkpoint files): per pusher, the first step of a worker
  // that rejoined (ChunkEngine::JoinAt), 0 for none.
  std::vector<uint64_t> join_from;
};

// A file of a checkpoint, as the manifest lists it.
struct CheckpointFile {
  std::string name;
  uint64_t bytes = 0;
  uint32_t crc32c = 0;
};

// The name of server `rank`'s file in checkpoint generation `generation`.
std::string ServerFileName(uint64_t generation, uint32_t rank);

// Writes `chunks` as the file `name` in `dir` (created if need be). `name` is a plain file name.
Result<CheckpointFile> WriteServerFile(const std::string& dir, const std::string& name,
                                       const std::vector<ChunkState>& chunks);

// The generation of the checkpoint `dir` holds (0: none, or a manifest that does not say).
uint64_t CurrentGeneration(const std::string& dir);

// Writes the manifest of generation `generation` listing `files`, replacing the last one
// atomically, then removes the files of other generations. `about` is stored as it is.
Status WriteManifest(const std::string& dir, uint64_t generation,
                     const std::vector<CheckpointFile>& files, const std::string& about);

// A checkpoint read back, every file checked against the manifest (size, CRC32C) and parsed:
// the chunks by tensor name, then by offset.
struct Checkpoint {
  std::string dir;
  std::map<std::string, std::map<uint64_t, ChunkState>> tensors;
  uint64_t chunks = 0;
};

// NotFound when `dir` has no MANIFEST (no checkpoint, or one that was interrupted); IOError
// naming the file whose size or CRC32C disagrees with the manifest, or that does not parse.
Result<Checkpoint> ReadCheckpoint(const std::string& dir);

}  // namespace shardps::server
