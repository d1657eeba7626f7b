#include "train/idx.h"

#include <zlib.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <system_error>

#include <fmt/format.h>

namespace shardps::train {
namespace {

constexpr uint32_t kImagesMagic = 0x00000803;
constexpr uint32_t kLabelsMagic = 0x00000801;
constexpr uint32_t kMaxSide = 1u << 14;  // larger images are surely a corrupt header
constexpr const char* kInstallHint =
    "install the Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
    "or pass --data-dir DIR";

// Big-endian u32 at `off`; false if it does not fit in `b`.
bool ReadU32(std::span<const uint8_t> b, size_t off, uint32_t* v) {
  if (off > b.size() || b.size() - off < 4) return false;
  *v = (uint32_t{b[off]} << 24) | (uint32_t{b[off + 1]} << 16) | (uint32_t{b[off + 2]} << 8) |
       uint32_t{b[off + 3]};
  return true;
}

// Reads the header: magic, then `ndims` u32 dimensions.
Status ReadHeader(std::span<const uint8_t> b, const std::string& name, uint32_t want_magic,
                  const char* kind, std::vector<uint32_t>* dims) {
  const size_t header = 4 * (1 + dims->size());
  uint32_t magic = 0;
  if (ReadU32(b, 0, &magic) && magic != want_magic) {
    std::string hint;
    if (b[0] == 0x1f && b[1] == 0x8b) hint = "; the data is still gzip-compressed";
    if (magic == kImagesMagic) hint = "; this is an IDX image file";
    if (magic == kLabelsMagic) hint = "; this is an IDX label file";
    return Status::InvalidArgument(
        fmt::format("{}: wrong magic number 0x{:08x} (expected 0x{:08x} for IDX {}){}", name, magic,
                    want_magic, kind, hint));
  }
  if (b.size() < header) {
    return Status::InvalidArgument(
        fmt::format("{}: truncated: the file holds only {} bytes but an IDX {} header needs {}",
                    name, b.size(), kind, header));
  }
  for (size_t i = 0; i < dims->size(); ++i) ReadU32(b, 4 * (i + 1), &(*dims)[i]);
  return Status::OK();
}

// Checks that exactly `need` payload bytes follow a header of `header` bytes.
Status CheckPayload(std::span<const uint8_t> b, const std::string& name, size_t header,
                    uint64_t need, const std::string& what) {
  const uint64_t have = b.size() - header;
  if (have < need) {
    return Status::InvalidArgument(
        fmt::format("{}: truncated: header says {} but the file holds only {} bytes (needs {})",
                    name, what, b.size(), header + need));
  }
  if (have > need) {
    return Status::InvalidArgument(
        fmt::format("{}: header says {} ({} bytes) but the file holds {} bytes: trailing data",
                    name, what, header + need, b.size()));
  }
  return Status::OK();
}

// `dir`/`base`.gz if it exists, else `dir`/`base`, else NotFound with the install hint.
Result<std::string> FindFile(const std::filesystem::path& dir, const std::string& base) {
  std::error_code ec;
  for (const std::string& candidate : {base + ".gz", base}) {
    const std::filesystem::path p = dir / candidate;
    if (std::filesystem::is_regular_file(p, ec)) return p.string();
  }
  if (!std::filesystem::is_directory(dir, ec)) {
    return Status::NotFound(
        fmt::format("Fashion-MNIST directory {} does not exist; {}", dir.string(), kInstallHint));
  }
  return Status::NotFound(
      fmt::format("{} (or {}.gz) not found in {}; {}", base, base, dir.string(), kInstallHint));
}

Result<Dataset> LoadSplit(const std::filesystem::path& dir, const std::string& prefix) {
  Dataset d;
  SHARDPS_ASSIGN_OR_RETURN(const std::string images_path,
                           FindFile(dir, prefix + "-images-idx3-ubyte"));
  SHARDPS_ASSIGN_OR_RETURN(const std::string labels_path,
                           FindFile(dir, prefix + "-labels-idx1-ubyte"));
  {
    SHARDPS_ASSIGN_OR_RETURN(const std::vector<uint8_t> bytes, ReadMaybeGzip(images_path));
    SHARDPS_RETURN_IF_ERROR(ParseIdxImages(bytes, images_path, &d));
  }
  {
    SHARDPS_ASSIGN_OR_RETURN(const std::vector<uint8_t> bytes, ReadMaybeGzip(labels_path));
    SHARDPS_RETURN_IF_ERROR(ParseIdxLabels(bytes, labels_path, &d));
  }
  if (d.size() != d.labels.size()) {
    return Status::InvalidArgument(fmt::format("{} holds {} images but {} holds {} labels",
                                               images_path, d.size(), labels_path,
                                               d.labels.size()));
  }
  for (size_t i = 0; i < d.labels.size(); ++i) {
    if (d.labels[i] >= 10) {
      return Status::InvalidArgument(
          fmt::format("{}: label {} of item {} is out of range (Fashion-MNIST has 10 classes)",
                      labels_path, d.labels[i], i));
    }
  }
  return d;
}

}  // namespace

Result<std::vector<uint8_t>> ReadMaybeGzip(const std::string& path) {
  std::error_code ec;
  const auto st = std::filesystem::status(path, ec);
  if (!std::filesystem::exists(st)) return Status::NotFound(fmt::format("{}: no such file", path));
  if (!std::filesystem::is_regular_file(st)) {
    return Status::IOError(fmt::format("{}: not a regular file", path));
  }
  errno = 0;
  gzFile f = gzopen(path.c_str(), "rb");
  if (f == nullptr) {
    return errno != 0 ? Status::FromErrno(fmt::format("gzopen {}", path), errno)
                      : Status::IOError(fmt::format("gzopen {}: out of memory", path));
  }
  gzbuffer(f, 1 << 17);
  std::vector<uint8_t> out;
  constexpr unsigned kChunk = 1 << 20;
  for (;;) {
    const size_t old = out.size();
    out.resize(old + kChunk);
    const int n = gzread(f, out.data() + old, kChunk);
    if (n < 0) {
      int err = 0;
      const char* msg = gzerror(f, &err);
      Status s = Status::IOError(
          fmt::format("{}: read failed: {}", path, err == Z_ERRNO ? std::strerror(errno) : msg));
      gzclose(f);
      return s;
    }
    out.resize(old + static_cast<size_t>(n));
    if (n == 0) break;
  }
  if (const int rc = gzclose(f); rc != Z_OK) {
    return Status::IOError(fmt::format("{}: close failed (zlib error {})", path, rc));
  }
  out.shrink_to_fit();
  return out;
}

Status ParseIdxImages(std::span<const uint8_t> bytes, const std::string& name, Dataset* out) {
  std::vector<uint32_t> dims(3);  // count, rows, cols
  SHARDPS_RETURN_IF_ERROR(ReadHeader(bytes, name, kImagesMagic, "images", &dims));
  const uint32_t count = dims[0], rows = dims[1], cols = dims[2];
  if (rows == 0 || cols == 0 || rows > kMaxSide || cols > kMaxSide) {
    return Status::InvalidArgument(
        fmt::format("{}: implausible image size {}x{} in the header", name, rows, cols));
  }
  const uint64_t pixels = uint64_t{rows} * cols;
  SHARDPS_RETURN_IF_ERROR(CheckPayload(bytes, name, 16, count * pixels,
                                       fmt::format("{} images of {}x{}", count, rows, cols)));
  std::vector<float> images(count * pixels);
  const uint8_t* src = bytes.data() + 16;
  for (size_t i = 0; i < images.size(); ++i) images[i] = static_cast<float>(src[i]) / 255.0f;
  out->rows = static_cast<int>(rows);
  out->cols = static_cast<int>(cols);
  out->images = std::move(images);
  return Status::OK();
}

Status ParseIdxLabels(std::span<const uint8_t> bytes, const std::string& name, Dataset* out) {
  std::vector<uint32_t> dims(1);  // count
  SHARDPS_RETURN_IF_ERROR(ReadHeader(bytes, name, kLabelsMagic, "labels", &dims));
  SHARDPS_RETURN_IF_ERROR(CheckPayload(bytes, name, 8, dims[0], fmt::format("{} labels", dims[0])));
  out->labels.assign(bytes.begin() + 8, bytes.end());
  return Status::OK();
}

Result<std::pair<Dataset, Dataset>> LoadFashionMnist(const std::string& dir) {
  SHARDPS_ASSIGN_OR_RETURN(Dataset train, LoadSplit(dir, "train"));
  SHARDPS_ASSIGN_OR_RETURN(Dataset test, LoadSplit(dir, "t10k"));
  if (train.rows != test.rows || train.cols != test.cols) {
    return Status::InvalidArgument(
        fmt::format("{}: train images are {}x{} but test images are {}x{}", dir, train.rows,
                    train.cols, test.rows, test.cols));
  }
  return std::make_pair(std::move(train), std::move(test));
}

}  // namespace shardps::train
