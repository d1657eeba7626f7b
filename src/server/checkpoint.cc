#include "server/checkpoint.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <filesystem>
#include <fstream>
#include <iterator>

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include "core/codec.h"
#include "core/crc32c.h"

namespace shardps::server {
namespace {

constexpr char kMagic[] = "SHARDPS-CHUNKS-1";  // 16 bytes, the first of every server file
constexpr char kManifest[] = "MANIFEST";
constexpr int kFormat = 1;

std::string Join(const std::string& dir, const std::string& name) { return dir + "/" + name; }

// fsync of a file or directory by path.
Status SyncPath(const std::string& path, bool directory) {
  int fd = ::open(path.c_str(), (directory ? O_RDONLY | O_DIRECTORY : O_RDONLY) | O_CLOEXEC);
  if (fd < 0) return Status::FromErrno("open " + path, errno);
  int rc = ::fsync(fd);
  int err = errno;
  ::close(fd);
  if (rc != 0) return Status::FromErrno("fsync " + path, err);
  return Status::OK();
}

// `bytes` into dir/name: written as dir/name.tmp, fsynced, renamed, the directory fsynced.
Status WriteDurably(const std::string& dir, const std::string& name, const Bytes& bytes) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return Status::IOError(fmt::format("cannot create {}: {}", dir, ec.message()));
  const std::string tmp = Join(dir, name + ".tmp"), final_path = Join(dir, name);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Status::FromErrno("create " + tmp, errno);
  size_t off = 0;
  while (off < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + off, bytes.size() - off);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      int err = errno;
      ::close(fd);
      return Status::FromErrno("write " + tmp, err);
    }
    off += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    int err = errno;
    ::close(fd);
    return Status::FromErrno("fsync " + tmp, err);
  }
  ::close(fd);
  if (::rename(tmp.c_str(), final_path.c_str()) != 0)
    return Status::FromErrno("rename " + tmp, errno);
  return SyncPath(dir, true);
}

Result<Bytes> ReadAll(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) return Status::NotFound("cannot open " + path);
  Bytes b((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  if (f.bad()) return Status::IOError("cannot read " + path);
  return b;
}

void EncodeChunk(const ChunkState& c, Writer* w) {
  w->PutString(c.tensor);
  w->Put<uint64_t>(c.chunk_id);
  w->Put<uint64_t>(c.offset);
  w->Put<uint64_t>(c.numel);
  w->Put<uint64_t>(c.version);
  w->Put<uint8_t>(c.optimizer);
  w->Put<uint64_t>(c.steps);
  w->PutVector(std::span<const uint64_t>(c.last_seq));
  w->PutVector(std::span<const float>(c.params));
  w->PutVector(std::span<const float>(c.m));
  w->PutVector(std::span<const float>(c.v));
}

bool DecodeChunk(Reader* r, ChunkState* c) {
  constexpr size_t kMax = size_t{1} << 40;
  if (!r->GetString(&c->tensor, 4096) || !r->Get(&c->chunk_id) || !r->Get(&c->offset) ||
      !r->Get(&c->numel) || !r->Get(&c->version) || !r->Get(&c->optimizer) || !r->Get(&c->steps) ||
      !r->GetVector(&c->last_seq, 1 << 24) || !r->GetVector(&c->params, kMax) ||
      !r->GetVector(&c->m, kMax) || !r->GetVector(&c->v, kMax))
    return false;
  // The arrays agree with the chunk's size: parameters always, state as the optimizer keeps it.
  auto fits = [&](const std::vector<float>& a) { return a.empty() || a.size() == c->numel; };
  return c->params.size() == c->numel && fits(c->m) && fits(c->v) && c->optimizer <= 3;
}

}  // namespace

std::string ServerFileName(uint64_t generation, uint32_t rank) {
  return fmt::format("g{}-server-{}.chunks", generation, rank);
}

Result<CheckpointFile> WriteServerFile(const std::string& dir, const std::string& name,
                                       const std::vector<ChunkState>& chunks) {
  if (name.empty() || name.find('/') != std::string::npos || name[0] == '.')
    return Status::InvalidArgument(fmt::format("checkpoint file name '{}'", name));
  Bytes b;
  Writer w(&b);
  w.PutRaw(kMagic, 16);
  w.Put<uint64_t>(chunks.size());
  for (const auto& c : chunks) EncodeChunk(c, &w);
  CheckpointFile f{name, b.size(), Crc32c(b.data(), b.size())};
  SHARDPS_RETURN_IF_ERROR(WriteDurably(dir, f.name, b));
  return f;
}

uint64_t CurrentGeneration(const std::string& dir) {
  auto text = ReadAll(Join(dir, kManifest));
  if (!text.ok()) return 0;
  nlohmann::json j = nlohmann::json::parse(text->begin(), text->end(), nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("generation") ||
      !j["generation"].is_number_unsigned())
    return 0;
  return j["generation"].get<uint64_t>();
}

Status WriteManifest(const std::string& dir, uint64_t generation,
                     const std::vector<CheckpointFile>& files, const std::string& about) {
  nlohmann::json j;
  j["format"] = kFormat;
  j["generation"] = generation;
  j["about"] = about;
  j["files"] = nlohmann::json::array();
  for (const auto& f : files)
    j["files"].push_back(
        {{"name", f.name}, {"bytes", f.bytes}, {"crc32c", fmt::format("{:08x}", f.crc32c)}});
  const std::string text = j.dump(2) + "\n";
  SHARDPS_RETURN_IF_ERROR(WriteDurably(dir, kManifest, Bytes(text.begin(), text.end())));
  // The files of earlier (or interrupted) generations are no longer listed: removed, as far as
  // that goes (what is left is only space).
  std::error_code ec;
  for (const auto& e : std::filesystem::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    const bool ours = name.size() > 7 && name[0] == 'g' &&
                      name.find("-server-") != std::string::npos &&
                      (name.ends_with(".chunks") || name.ends_with(".chunks.tmp"));
    const bool listed = std::any_of(files.begin(), files.end(),
                                    [&](const CheckpointFile& f) { return f.name == name; });
    if (ours && !listed) std::filesystem::remove(e.path(), ec);
  }
  return Status::OK();
}

Result<Checkpoint> ReadCheckpoint(const std::string& dir) {
  const std::string mpath = Join(dir, kManifest);
  auto mtext = ReadAll(mpath);
  if (!mtext.ok())
    return Status::NotFound(fmt::format(
        "no checkpoint in {}: {} is missing (none was written there, or the last one was "
        "interrupted before it completed)",
        dir, mpath));
  nlohmann::json j = nlohmann::json::parse(mtext->begin(), mtext->end(), nullptr, false);
  if (j.is_discarded() || !j.is_object() || !j.contains("format") ||
      !j["format"].is_number_integer() || j["format"].get<int64_t>() != kFormat ||
      !j.contains("files") || !j["files"].is_array())
    return Status::IOError(
        fmt::format("{} is not a ShardPS checkpoint manifest of format {}", mpath, kFormat));
  Checkpoint cp;
  cp.dir = dir;
  for (const auto& e : j["files"]) {
    if (!e.is_object() || !e.contains("name") || !e["name"].is_string() || !e.contains("bytes") ||
        !e["bytes"].is_number_unsigned() || !e.contains("crc32c") || !e["crc32c"].is_string())
      return Status::IOError(fmt::format("{}: malformed file entry {}", mpath, e.dump()));
    const std::string name = e["name"];
    if (name.find('/') != std::string::npos || name.empty() || name[0] == '.')
      return Status::IOError(fmt::format("{}: file name '{}' outside the directory", mpath, name));
    const std::string path = Join(dir, name);
    auto data = ReadAll(path);
    if (!data.ok()) return Status::IOError(fmt::format("checkpoint file {} is missing", path));
    const uint64_t want_bytes = e["bytes"];
    if (data->size() != want_bytes)
      return Status::IOError(fmt::format("checkpoint file {} has {} bytes, the manifest says {}",
                                         path, data->size(), want_bytes));
    const std::string crc = fmt::format("{:08x}", Crc32c(data->data(), data->size()));
    if (crc != e["crc32c"].get<std::string>())
      return Status::IOError(
          fmt::format("checkpoint file {} is corrupt: its CRC32C is {}, the manifest says {}", path,
                      crc, e["crc32c"].get<std::string>()));
    Reader r(data->data(), data->size());
    uint64_t count = 0;
    bool ok = data->size() >= 16 && std::memcmp(data->data(), kMagic, 16) == 0;
    if (ok) r = Reader(data->data() + 16, data->size() - 16);
    ok = ok && r.Get(&count) && r.Fits(count, 64);
    for (uint64_t i = 0; ok && i < count; ++i) {
      ChunkState c;
      ok = DecodeChunk(&r, &c);
      if (ok) {
        auto& t = cp.tensors[c.tensor];
        ok = t.emplace(c.offset, std::move(c)).second;  // a chunk twice: not ours
        cp.chunks++;
      }
    }
    if (!ok || !r.done())
      return Status::IOError(fmt::format("checkpoint file {} does not parse", path));
  }
  return cp;
}

}  // namespace shardps::server
