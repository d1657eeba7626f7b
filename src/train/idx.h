// Reader for the IDX file format used by (Fashion-)MNIST.
#pragma once

#include <cstddef>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "shardps/status.h"

namespace shardps::train {

// Where the Debian package dataset-fashion-mnist installs the four .gz files.
inline constexpr const char* kDefaultFashionMnistDir = "/usr/share/datasets/fashion-mnist";

// Images and labels of one split. Image i occupies images[i*rows*cols, (i+1)*rows*cols),
// row-major, with pixels scaled to [0, 1].
struct Dataset {
  int rows = 0, cols = 0;
  std::vector<float> images;
  std::vector<uint8_t> labels;

  // Number of images (or of labels when no images are loaded).
  size_t size() const {
    const size_t pixels = static_cast<size_t>(rows) * static_cast<size_t>(cols);
    return pixels > 0 ? images.size() / pixels : labels.size();
  }
};

// Reads a whole file, transparently decompressing it if it is gzip-compressed.
// NotFound if the file does not exist, IOError on any read or decompression error.
Result<std::vector<uint8_t>> ReadMaybeGzip(const std::string& path);

// Parses an IDX3 image file (magic 0x00000803) into out->rows, out->cols and out->images;
// `name` prefixes error messages. `out` is left untouched on error.
Status ParseIdxImages(std::span<const uint8_t> bytes, const std::string& name, Dataset* out);

// Parses an IDX1 label file (magic 0x00000801) into out->labels; `out` untouched on error.
Status ParseIdxLabels(std::span<const uint8_t> bytes, const std::string& name, Dataset* out);

// Loads (train, test) from `dir`, which holds train-images-idx3-ubyte, train-labels-idx1-ubyte,
// t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte, each optionally with a .gz suffix.
// Checks image count == label count, labels < 10, and that both splits have the same shape.
Result<std::pair<Dataset, Dataset>> LoadFashionMnist(const std::string& dir);

}  // namespace shardps::train
