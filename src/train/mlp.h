// A multi-layer perceptron (ReLU hidden layers, softmax cross-entropy) whose parameters live
// outside it, as a list of named float32 tensors, so that they can be stored in a parameter
// server. The math uses Eigen; Eigen does not appear in this header.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "shardps/status.h"

namespace shardps::train {

// Layer widths, input first, classes last.
struct MlpShape {
  std::vector<int> layers{784, 256, 128, 10};
};

// OK if there are at least two layers, all of positive width.
Status ValidateShape(const MlpShape& shape);

// One parameter tensor, stored row-major: weight[o * in + i], bias[o].
struct ParamSpec {
  std::string name;   // "fc1.weight", "fc1.bias", "fc2.weight", ...
  size_t rows, cols;  // weights: out x in; biases: out x 1
  size_t size() const { return rows * cols; }
};

// The tensors of `shape`, in order: fc1.weight, fc1.bias, fc2.weight, fc2.bias, ...
std::vector<ParamSpec> ParamSpecs(const MlpShape& shape);

// Total number of floats over all tensors.
size_t NumParams(const MlpShape& shape);

// Initial values, one vector per ParamSpecs() entry: Kaiming-uniform weights
// (U(-b, b), b = sqrt(6 / fan_in)) and zero biases. Deterministic for a given seed on every
// platform (std::mt19937_64 with a fixed transform, no std:: distributions).
std::vector<std::vector<float>> InitParams(const MlpShape& shape, uint64_t seed);

// A model's tensors, and the pointer lists that Mlp's methods take.
using Tensors = std::vector<std::vector<float>>;
inline std::vector<const float*> ConstPtrs(const Tensors& ts) {
  std::vector<const float*> p;
  for (const auto& t : ts) p.push_back(t.data());
  return p;
}
inline std::vector<float*> Ptrs(Tensors& ts) {
  std::vector<float*> p;
  for (auto& t : ts) p.push_back(t.data());
  return p;
}

// Evaluates the network. `params` (and `grads`) hold one pointer per ParamSpecs() entry.
// Inputs `x` are row-major, one sample of layers[0] floats after another; labels must be
// < layers.back(). The object keeps scratch buffers, so repeated calls with the same batch size
// do not allocate; it is not thread-safe (use one Mlp per thread).
class Mlp {
 public:
  // `shape` must pass ValidateShape().
  explicit Mlp(MlpShape shape);
  ~Mlp();
  Mlp(Mlp&&) noexcept;
  Mlp& operator=(Mlp&&) noexcept;

  const MlpShape& shape() const;

  // Mean softmax cross-entropy loss over `batch` samples; overwrites `grads` with the gradient
  // of that mean loss. Returns NaN without touching `grads` if the arguments are inconsistent
  // (wrong number of tensors, batch <= 0, a label out of range).
  float ForwardBackward(const std::vector<const float*>& params, const float* x,
                        const uint8_t* labels, int batch, const std::vector<float*>& grads);

  // Mean loss over `n` samples (evaluated in chunks); NaN on inconsistent arguments.
  float Loss(const std::vector<const float*>& params, const float* x, const uint8_t* labels, int n);

  // How many of `n` samples have argmax(logits) == label; -1 on inconsistent arguments.
  int CountCorrect(const std::vector<const float*>& params, const float* x, const uint8_t* labels,
                   int n);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace shardps::train
