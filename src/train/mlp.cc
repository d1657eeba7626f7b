#include "train/mlp.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include <fmt/format.h>
#include <Eigen/Core>

namespace shardps::train {
namespace {

using RowMajor = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using ConstWeights = Eigen::Map<const RowMajor>;
using Weights = Eigen::Map<RowMajor>;
// Samples as columns: a row-major (n x features) block is a column-major (features x n) matrix.
using ConstSamples = Eigen::Map<const Eigen::MatrixXf>;

constexpr int kEvalChunk = 512;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

}  // namespace

Status ValidateShape(const MlpShape& shape) {
  if (shape.layers.size() < 2) {
    return Status::InvalidArgument("an MLP needs at least an input and an output layer");
  }
  for (int w : shape.layers) {
    if (w <= 0) return Status::InvalidArgument(fmt::format("layer width {} is not positive", w));
  }
  return Status::OK();
}

std::vector<ParamSpec> ParamSpecs(const MlpShape& shape) {
  std::vector<ParamSpec> specs;
  for (size_t l = 0; l + 1 < shape.layers.size(); ++l) {
    const auto in = static_cast<size_t>(shape.layers[l]);
    const auto out = static_cast<size_t>(shape.layers[l + 1]);
    specs.push_back({fmt::format("fc{}.weight", l + 1), out, in});
    specs.push_back({fmt::format("fc{}.bias", l + 1), out, 1});
  }
  return specs;
}

size_t NumParams(const MlpShape& shape) {
  size_t n = 0;
  for (const ParamSpec& s : ParamSpecs(shape)) n += s.size();
  return n;
}

std::vector<std::vector<float>> InitParams(const MlpShape& shape, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<std::vector<float>> params;
  for (const ParamSpec& spec : ParamSpecs(shape)) {
    std::vector<float> t(spec.size(), 0.0f);
    if (spec.name.ends_with(".weight")) {
      const double bound = std::sqrt(6.0 / static_cast<double>(spec.cols));
      for (float& v : t) {
        const double u = static_cast<double>(rng() >> 11) * 0x1.0p-53;  // [0, 1)
        v = static_cast<float>((2.0 * u - 1.0) * bound);
      }
    }
    params.push_back(std::move(t));
  }
  return params;
}

struct Mlp::Impl {
  // Per-call-kind scratch, so that training and evaluation batches of different sizes do not
  // make each other reallocate.
  struct Scratch {
    std::vector<Eigen::MatrixXf> acts;  // acts[l]: output of layer l (features x n)
    Eigen::RowVectorXf colmax, colsum;
  };

  MlpShape shape;
  bool valid;
  int num_layers;  // weight layers
  Scratch train, eval;
  std::vector<Eigen::MatrixXf> deltas;  // deltas[l]: d loss / d pre-activation of layer l

  explicit Impl(MlpShape s)
      : shape(std::move(s)),
        valid(ValidateShape(shape).ok()),
        num_layers(valid ? static_cast<int>(shape.layers.size()) - 1 : 0) {
    train.acts.resize(num_layers);
    eval.acts.resize(num_layers);
    if (num_layers > 1) deltas.resize(num_layers - 1);
  }

  int in(int l) const { return shape.layers[l]; }
  int out(int l) const { return shape.layers[l + 1]; }

  bool Consistent(size_t num_params, const uint8_t* labels, int n) const {
    if (!valid || n <= 0 || num_params != 2 * static_cast<size_t>(num_layers)) {
      return false;
    }
    if (labels != nullptr) {
      for (int i = 0; i < n; ++i) {
        if (labels[i] >= shape.layers.back()) return false;
      }
    }
    return true;
  }

  // Leaves the logits of samples x[0, n) in s.acts.back().
  void Forward(const std::vector<const float*>& p, const float* x, int n, Scratch& s) const {
    for (int l = 0; l < num_layers; ++l) {
      ConstWeights w(p[2 * l], out(l), in(l));
      Eigen::Map<const Eigen::VectorXf> b(p[2 * l + 1], out(l));
      Eigen::MatrixXf& z = s.acts[l];
      z.resize(out(l), n);
      if (l == 0) {
        z.noalias() = w * ConstSamples(x, in(0), n);
      } else {
        z.noalias() = w * s.acts[l - 1];
      }
      z.colwise() += b;
      if (l + 1 < num_layers) z.array() = z.array().max(0.0f);
    }
  }

  // Turns the logits in s.acts.back() into softmax probabilities; returns the summed loss.
  static double SoftmaxXent(Scratch& s, const uint8_t* labels, int n) {
    Eigen::MatrixXf& z = s.acts.back();
    s.colmax = z.colwise().maxCoeff();
    z.rowwise() -= s.colmax;
    double total = 0.0;
    for (int i = 0; i < n; ++i) total -= z(labels[i], i);
    z.array() = z.array().exp();
    s.colsum = z.colwise().sum();
    for (int i = 0; i < n; ++i) total += std::log(static_cast<double>(s.colsum[i]));
    z.array().rowwise() /= s.colsum.array();
    return total;
  }
};

Mlp::Mlp(MlpShape shape) : impl_(std::make_unique<Impl>(std::move(shape))) {}
Mlp::~Mlp() = default;
Mlp::Mlp(Mlp&&) noexcept = default;
Mlp& Mlp::operator=(Mlp&&) noexcept = default;

const MlpShape& Mlp::shape() const { return impl_->shape; }

float Mlp::ForwardBackward(const std::vector<const float*>& params, const float* x,
                           const uint8_t* labels, int batch, const std::vector<float*>& grads) {
  Impl& m = *impl_;
  if (!m.Consistent(params.size(), labels, batch) || grads.size() != params.size()) return kNaN;
  Impl::Scratch& s = m.train;
  m.Forward(params, x, batch, s);
  const double loss = Impl::SoftmaxXent(s, labels, batch);

  // d mean-loss / d logits = (softmax - onehot) / batch, computed in place.
  Eigen::MatrixXf& top = s.acts.back();
  for (int i = 0; i < batch; ++i) top(labels[i], i) -= 1.0f;
  top *= 1.0f / static_cast<float>(batch);

  for (int l = m.num_layers - 1; l >= 0; --l) {
    const Eigen::MatrixXf& delta = l == m.num_layers - 1 ? top : m.deltas[l];
    Weights gw(grads[2 * l], m.out(l), m.in(l));
    if (l == 0) {
      gw.noalias() = delta * ConstSamples(x, m.in(0), batch).transpose();
    } else {
      gw.noalias() = delta * s.acts[l - 1].transpose();
    }
    Eigen::Map<Eigen::VectorXf>(grads[2 * l + 1], m.out(l)) = delta.rowwise().sum();
    if (l > 0) {
      Eigen::MatrixXf& prev = m.deltas[l - 1];
      prev.resize(m.in(l), batch);
      prev.noalias() = ConstWeights(params[2 * l], m.out(l), m.in(l)).transpose() * delta;
      prev.array() = (s.acts[l - 1].array() > 0.0f).select(prev.array(), 0.0f);
    }
  }
  return static_cast<float>(loss / batch);
}

float Mlp::Loss(const std::vector<const float*>& params, const float* x, const uint8_t* labels,
                int n) {
  Impl& m = *impl_;
  if (!m.Consistent(params.size(), labels, n)) return kNaN;
  double total = 0.0;
  for (int start = 0; start < n; start += kEvalChunk) {
    const int k = std::min(kEvalChunk, n - start);
    m.Forward(params, x + static_cast<size_t>(start) * m.in(0), k, m.eval);
    total += Impl::SoftmaxXent(m.eval, labels + start, k);
  }
  return static_cast<float>(total / n);
}

int Mlp::CountCorrect(const std::vector<const float*>& params, const float* x,
                      const uint8_t* labels, int n) {
  Impl& m = *impl_;
  if (!m.Consistent(params.size(), nullptr, n)) return n == 0 ? 0 : -1;
  int correct = 0;
  for (int start = 0; start < n; start += kEvalChunk) {
    const int k = std::min(kEvalChunk, n - start);
    m.Forward(params, x + static_cast<size_t>(start) * m.in(0), k, m.eval);
    const Eigen::MatrixXf& logits = m.eval.acts.back();
    for (int i = 0; i < k; ++i) {
      Eigen::Index best = 0;
      logits.col(i).maxCoeff(&best);
      correct += best == labels[start + i] ? 1 : 0;
    }
  }
  return correct;
}

}  // namespace shardps::train
