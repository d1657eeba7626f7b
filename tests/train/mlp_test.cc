#include "train/mlp.h"

#include <algorithm>
#include <cmath>
#include <random>

#include <gtest/gtest.h>

namespace shardps::train {
namespace {

std::vector<const float*> ConstPtrs(const std::vector<std::vector<float>>& ts) {
  std::vector<const float*> p;
  for (const auto& t : ts) p.push_back(t.data());
  return p;
}

std::vector<float*> Ptrs(std::vector<std::vector<float>>& ts) {
  std::vector<float*> p;
  for (auto& t : ts) p.push_back(t.data());
  return p;
}

std::vector<std::vector<float>> ZerosLike(const std::vector<std::vector<float>>& ts) {
  std::vector<std::vector<float>> z;
  for (const auto& t : ts) z.emplace_back(t.size(), 0.0f);
  return z;
}

TEST(MlpTest, ParamSpecs) {
  const auto specs = ParamSpecs(MlpShape{});
  ASSERT_EQ(specs.size(), 6u);
  EXPECT_EQ(specs[0].name, "fc1.weight");
  EXPECT_EQ(specs[0].rows, 256u);
  EXPECT_EQ(specs[0].cols, 784u);
  EXPECT_EQ(specs[1].name, "fc1.bias");
  EXPECT_EQ(specs[1].rows, 256u);
  EXPECT_EQ(specs[1].cols, 1u);
  EXPECT_EQ(specs[4].name, "fc3.weight");
  EXPECT_EQ(specs[4].rows, 10u);
  EXPECT_EQ(specs[4].cols, 128u);
  EXPECT_EQ(NumParams(MlpShape{}), 784u * 256 + 256 + 256 * 128 + 128 + 128 * 10 + 10);
  EXPECT_TRUE(ValidateShape(MlpShape{}).ok());
  EXPECT_FALSE(ValidateShape(MlpShape{{5}}).ok());
  EXPECT_FALSE(ValidateShape(MlpShape{{5, 0, 3}}).ok());
}

TEST(MlpTest, InitParamsIsDeterministic) {
  const MlpShape shape{{6, 5, 4, 3}};
  const auto a = InitParams(shape, 7), b = InitParams(shape, 7), c = InitParams(shape, 8);
  EXPECT_EQ(a, b);
  EXPECT_NE(a, c);
  const auto specs = ParamSpecs(shape);
  ASSERT_EQ(a.size(), specs.size());
  for (size_t t = 0; t < specs.size(); ++t) {
    ASSERT_EQ(a[t].size(), specs[t].size());
    const bool is_bias = specs[t].cols == 1;
    const float bound = std::sqrt(6.0f / static_cast<float>(specs[t].cols));
    float max_abs = 0;
    for (float v : a[t]) {
      if (is_bias) {
        EXPECT_EQ(v, 0.0f);
      }
      EXPECT_LE(std::abs(v), bound);
      max_abs = std::max(max_abs, std::abs(v));
    }
    if (!is_bias) {
      EXPECT_GT(max_abs, 0.3f * bound) << specs[t].name;
    }
  }
}

// Plain double-precision reference of the network: mean loss, and in *margin the smallest
// |pre-activation| of any hidden unit (how far the inputs are from a ReLU kink).
double ReferenceLoss(const MlpShape& shape, const std::vector<std::vector<float>>& params,
                     const std::vector<float>& x, const std::vector<uint8_t>& labels,
                     double* margin) {
  const size_t n = labels.size(), layers = shape.layers.size() - 1;
  double total = 0;
  *margin = 1e30;
  for (size_t s = 0; s < n; ++s) {
    std::vector<double> a(x.begin() + s * shape.layers[0], x.begin() + (s + 1) * shape.layers[0]);
    for (size_t l = 0; l < layers; ++l) {
      const size_t in = shape.layers[l], out = shape.layers[l + 1];
      std::vector<double> z(out);
      for (size_t o = 0; o < out; ++o) {
        z[o] = params[2 * l + 1][o];
        for (size_t i = 0; i < in; ++i) z[o] += params[2 * l][o * in + i] * a[i];
        if (l + 1 < layers) {
          *margin = std::min(*margin, std::abs(z[o]));
          z[o] = std::max(z[o], 0.0);
        }
      }
      a = std::move(z);
    }
    const double mx = *std::max_element(a.begin(), a.end());
    double sum = 0;
    for (double v : a) sum += std::exp(v - mx);
    total += std::log(sum) - (a[labels[s]] - mx);
  }
  return total / static_cast<double>(n);
}

TEST(MlpTest, GradientMatchesFiniteDifferences) {
  const MlpShape shape{{6, 5, 4, 3}};
  constexpr int kBatch = 4;
  constexpr float kEps = 1e-3f;
  const std::vector<uint8_t> labels{0, 2, 1, 2};
  auto params = InitParams(shape, 42);
  std::vector<float> x(kBatch * 6);
  // Draw inputs and biases until no hidden unit is within 0.02 of its ReLU kink: a finite
  // difference across a kink measures the kink, not the gradient.
  double margin = 0, reference = 0;
  for (uint64_t seed = 1; margin < 0.02; ++seed) {
    ASSERT_LT(seed, 1000u) << "no kink-free test data";
    std::mt19937_64 rng(seed);
    const auto uniform = [&](double lo, double hi) {
      return static_cast<float>(lo + (hi - lo) * static_cast<double>(rng() >> 11) * 0x1.0p-53);
    };
    for (size_t t = 1; t < params.size(); t += 2) {
      for (float& v : params[t]) v = uniform(-0.2, 0.2);  // non-zero biases
    }
    for (float& v : x) v = uniform(-1, 1);
    reference = ReferenceLoss(shape, params, x, labels, &margin);
  }

  Mlp mlp(shape);
  auto grads = ZerosLike(params);
  const float loss =
      mlp.ForwardBackward(ConstPtrs(params), x.data(), labels.data(), kBatch, Ptrs(grads));
  EXPECT_NEAR(loss, reference, 1e-5);
  EXPECT_NEAR(mlp.Loss(ConstPtrs(params), x.data(), labels.data(), kBatch), reference, 1e-5);

  // Every coordinate of every tensor (there are only 74), against central differences of the
  // float loss and of the double reference.
  const auto specs = ParamSpecs(shape);
  for (size_t t = 0; t < params.size(); ++t) {
    for (size_t i = 0; i < params[t].size(); ++i) {
      const float saved = params[t][i];
      double m = 0;
      params[t][i] = saved + kEps;
      const double up = mlp.Loss(ConstPtrs(params), x.data(), labels.data(), kBatch);
      const double ref_up = ReferenceLoss(shape, params, x, labels, &m);
      params[t][i] = saved - kEps;
      const double down = mlp.Loss(ConstPtrs(params), x.data(), labels.data(), kBatch);
      const double ref_down = ReferenceLoss(shape, params, x, labels, &m);
      params[t][i] = saved;
      // The step actually taken in float, not the nominal 2 * eps.
      const double step = static_cast<double>(saved + kEps) - static_cast<double>(saved - kEps);
      const double analytic = grads[t][i];
      const auto rel = [&](double numeric) {
        return std::abs(numeric - analytic) /
               std::max({std::abs(numeric), std::abs(analytic), 1e-2});
      };
      EXPECT_LT(rel((up - down) / step), 1e-2) << specs[t].name << "[" << i << "]: analytic "
                                               << analytic << " numeric " << (up - down) / step;
      EXPECT_LT(rel((ref_up - ref_down) / step), 1e-3)
          << specs[t].name << "[" << i << "]: analytic " << analytic << " reference "
          << (ref_up - ref_down) / step;
    }
  }
}

TEST(MlpTest, RejectsInconsistentArguments) {
  const MlpShape shape{{6, 5, 3}};
  auto params = InitParams(shape, 1);
  auto grads = ZerosLike(params);
  std::vector<float> x(6, 0.5f);
  Mlp mlp(shape);
  const uint8_t bad_label = 3, good_label = 2;
  EXPECT_TRUE(
      std::isnan(mlp.ForwardBackward(ConstPtrs(params), x.data(), &bad_label, 1, Ptrs(grads))));
  EXPECT_TRUE(std::isnan(mlp.Loss(ConstPtrs(params), x.data(), &good_label, 0)));
  auto fewer = ConstPtrs(params);
  fewer.pop_back();
  EXPECT_TRUE(std::isnan(mlp.Loss(fewer, x.data(), &good_label, 1)));
  EXPECT_EQ(mlp.CountCorrect(fewer, x.data(), &good_label, 1), -1);
  EXPECT_EQ(grads, ZerosLike(params));  // untouched
}

TEST(MlpTest, SgdLearnsSeparableProblem) {
  // Three Gaussian-ish blobs in 4-D around well separated centres.
  const MlpShape shape{{4, 16, 3}};
  constexpr int kN = 60;
  std::mt19937_64 rng(11);
  const auto noise = [&] { return static_cast<float>((rng() >> 40) * 0x1.0p-24 - 0.5); };
  std::vector<float> x(kN * 4);
  std::vector<uint8_t> labels(kN);
  for (int i = 0; i < kN; ++i) {
    labels[i] = static_cast<uint8_t>(i % 3);
    for (int f = 0; f < 4; ++f) x[i * 4 + f] = (f == labels[i] ? 2.0f : 0.0f) + noise();
  }
  auto params = InitParams(shape, 5);
  auto grads = ZerosLike(params);
  Mlp mlp(shape);
  const float initial = mlp.Loss(ConstPtrs(params), x.data(), labels.data(), kN);
  constexpr float kLr = 0.2f;
  for (int step = 0; step < 300; ++step) {
    // Minibatches of 20 (a different batch size than the full-data evaluation).
    const int start = (step % 3) * 20;
    mlp.ForwardBackward(ConstPtrs(params), x.data() + start * 4, labels.data() + start, 20,
                        Ptrs(grads));
    for (size_t t = 0; t < params.size(); ++t) {
      for (size_t i = 0; i < params[t].size(); ++i) params[t][i] -= kLr * grads[t][i];
    }
  }
  const float final_loss = mlp.Loss(ConstPtrs(params), x.data(), labels.data(), kN);
  EXPECT_LT(final_loss, initial / 20) << "initial " << initial;
  EXPECT_EQ(mlp.CountCorrect(ConstPtrs(params), x.data(), labels.data(), kN), kN);
}

TEST(MlpTest, ChunkedEvaluationMatchesOneBatch) {
  // Loss and CountCorrect split n > 512 into chunks; the result must not depend on that.
  const MlpShape shape{{3, 8, 4}};
  constexpr int kN = 1300;
  std::mt19937_64 rng(2);
  std::vector<float> x(kN * 3);
  std::vector<uint8_t> labels(kN);
  for (float& v : x) v = static_cast<float>((rng() >> 40) * 0x1.0p-24);
  for (auto& l : labels) l = static_cast<uint8_t>(rng() % 4);
  const auto params = InitParams(shape, 9);
  auto grads = ZerosLike(params);
  Mlp mlp(shape);
  const float whole =
      mlp.ForwardBackward(ConstPtrs(params), x.data(), labels.data(), kN, Ptrs(grads));
  EXPECT_NEAR(mlp.Loss(ConstPtrs(params), x.data(), labels.data(), kN), whole, 1e-5);
  int correct = 0;
  for (int i = 0; i < kN; ++i) {
    correct += mlp.CountCorrect(ConstPtrs(params), x.data() + i * 3, labels.data() + i, 1);
  }
  EXPECT_EQ(mlp.CountCorrect(ConstPtrs(params), x.data(), labels.data(), kN), correct);
}

}  // namespace
}  // namespace shardps::train
