// The codecs (src/compress/): exact arithmetic where it exists, error bounds where it does not,
// error feedback's invariant, topk's count, refusal of malformed encodings, and the CPU update
// rule decoding them into its accumulation and update exactly as it would the decoded values.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <vector>

#include "compress/codec.h"
#include "compress/codec_math.h"
#include "server/update_rule.h"

namespace shardps::compress {
namespace {

std::vector<float> Random(uint64_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

std::vector<uint8_t> EncodeAll(const ChunkCodec& c, const std::vector<float>& x,
                               float* residual = nullptr) {
  std::vector<uint8_t> out(EncodedBytes(c, x.size()));
  Encode(c, x.data(), x.size(), out.data(), residual);
  return out;
}

std::vector<float> DecodeAll(const ChunkCodec& c, const std::vector<uint8_t>& enc, uint64_t n) {
  std::vector<float> out(n, -1.0f);
  EXPECT_TRUE(Check(c.codec, c.block, enc.data(), enc.size(), n).ok());
  DecodeRange(c.codec, c.block, enc.data(), n, 0, n, out.data(), false);
  return out;
}

// A topk warm-up: the share sent falls geometrically from 25% to the target over the first N
// pushes, never below the target, and every chunk's share still adds up to the tensor's k.
TEST(CompressionSpec, TopkWarmupSendsMoreAtFirstThenExactlyTheTarget) {
  auto c = Compression::Parse("topk:1%,warmup=100");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->warmup, 100u);
  EXPECT_EQ(Compression::Parse(c->ToString()).value(), *c);
  const uint64_t n = 200000;
  EXPECT_EQ(c->AtPush(n, 0).count, 50000u);   // 25%
  EXPECT_EQ(c->AtPush(n, 50).count, 10000u);  // the geometric mean of 25% and 1%: 5%
  uint64_t prev = n;
  for (uint64_t p = 0; p < 100; ++p) {
    const uint64_t k = c->AtPush(n, p).count;
    EXPECT_LE(k, prev);
    EXPECT_GE(k, 2000u);
    prev = k;
  }
  EXPECT_EQ(c->AtPush(n, 100), *c);  // after the warm-up: itself
  EXPECT_EQ(c->AtPush(n, 5000), *c);
  EXPECT_EQ(Compression::Parse("topk:1%").value().AtPush(n, 0),
            Compression::Parse("topk:1%").value());
  // Chunks share the push's k exactly.
  const Compression w = c->AtPush(n, 7);
  uint64_t sum = 0;
  for (uint64_t off = 0; off < n; off += 65536)
    sum += compress::ForChunk(w, n, off, std::min<uint64_t>(65536, n - off)).k;
  EXPECT_EQ(sum, w.count);
  EXPECT_FALSE(Compression::Parse("topk:1%,warmup=x").ok());
  EXPECT_FALSE(Compression::Parse("int8:warmup=10").ok());
}

TEST(CompressionSpec, ParsesEveryCodecAndItsOptions) {
  auto c = Compression::Parse("int8:block=128");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->codec, Codec::kInt8);
  EXPECT_EQ(c->block, 128u);
  EXPECT_FALSE(c->error_feedback);
  c = Compression::Parse("onebit");
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->error_feedback);
  c = Compression::Parse("topk:1%");
  ASSERT_TRUE(c.ok());
  EXPECT_DOUBLE_EQ(c->ratio, 0.01);
  EXPECT_EQ(c->count, 0u);
  c = Compression::Parse("topk:k=1000,ef=off");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->count, 1000u);
  EXPECT_FALSE(c->error_feedback);
  EXPECT_EQ(c->ToString(), "topk:k=1000,ef=off");
  EXPECT_EQ(Compression::Parse(c->ToString()).value(), *c);
  c = Compression::Parse("topk");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->min_numel, 16384u);  // small tensors go uncompressed by default
  EXPECT_EQ(c->ToString(), "topk:ratio=0.01");
  c = Compression::Parse("topk:1%,min=0");
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->min_numel, 0u);
  EXPECT_EQ(Compression::Parse(c->ToString()).value(), *c);
  EXPECT_EQ(Compression::Parse("int8").value().min_numel, 0u);
  c = Compression::Parse("fp16:ef=on");
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->error_feedback);
  for (const char* bad : {"int9", "int8:block=0", "topk:0.9", "topk:ratio=x", "fp16:block=4",
                          "onebit:ef=maybe", "topk:k=0", ""}) {
    auto r = Compression::Parse(bad);
    EXPECT_FALSE(r.ok()) << bad;
    EXPECT_TRUE(r.status().IsInvalidArgument()) << bad;
  }
}

TEST(Fp16, EveryRepresentableValueRoundTripsBitExact) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = HalfToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) {
      EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f))));
      continue;
    }
    ASSERT_EQ(FloatToHalf(f), h) << "half 0x" << std::hex << h;
  }
}

TEST(Fp16, RoundsToNearestEvenAndOverflowsToInfinity) {
  EXPECT_EQ(FloatToHalf(1.0f + std::ldexp(1.0f, -11)), 0x3c00);      // tie: down to even
  EXPECT_EQ(FloatToHalf(1.0f + 3 * std::ldexp(1.0f, -11)), 0x3c02);  // tie: up to even
  EXPECT_EQ(FloatToHalf(65519.0f), 0x7bff);                          // 65504
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);                          // inf
  EXPECT_EQ(FloatToHalf(-1e10f), 0xfc00);
  EXPECT_EQ(FloatToHalf(std::ldexp(1.0f, -25)), 0x0000);  // half the smallest subnormal: even
  EXPECT_EQ(FloatToHalf(std::ldexp(3.0f, -25)), 0x0002);
  // Against the float arithmetic: the half nearest to x, measured.
  auto v = Random(20000, 3, 1000.0f);
  for (float x : v) {
    float r = HalfToFloat(FloatToHalf(x));
    uint16_t h = FloatToHalf(x);
    float up = HalfToFloat(static_cast<uint16_t>(h + 1)),
          down = HalfToFloat(static_cast<uint16_t>(h - 1));
    EXPECT_LE(std::fabs(r - x), std::fabs(up - x)) << x;
    EXPECT_LE(std::fabs(r - x), std::fabs(down - x)) << x;
  }
}

TEST(Bf16, EveryRepresentableValueRoundTripsBitExact) {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float f = Bf16ToFloat(static_cast<uint16_t>(h));
    if (std::isnan(f)) continue;
    ASSERT_EQ(FloatToBf16(f), h) << "bf16 0x" << std::hex << h;
  }
  EXPECT_EQ(FloatToBf16(BitsFloat(0x3f808000u)), 0x3f80);  // tie: down to even
  EXPECT_EQ(FloatToBf16(BitsFloat(0x3f818000u)), 0x3f82);  // tie: up to even
  EXPECT_TRUE(std::isnan(Bf16ToFloat(FloatToBf16(std::numeric_limits<float>::quiet_NaN()))));
}

TEST(Int8, ErrorIsWithinHalfAStepOfEachBlocksScale) {
  for (uint32_t block : {1u, 7u, 256u, 1000u}) {
    ChunkCodec c{Codec::kInt8, block, 0};
    auto x = Random(3001, block, 5.0f);
    auto enc = EncodeAll(c, x);
    auto y = DecodeAll(c, enc, x.size());
    for (uint64_t i = 0; i < x.size(); ++i) {
      float scale;
      std::memcpy(&scale, enc.data() + 4 * (i / block), 4);
      EXPECT_LE(std::fabs(y[i] - x[i]), scale * 0.5f * (1 + 1e-6f) + 1e-30f) << i;
    }
  }
}

TEST(ErrorFeedback, DecodedPlusResidualEqualsTheInputs) {
  const uint64_t n = 4099;
  for (Codec k : {Codec::kFp16, Codec::kBf16, Codec::kInt8, Codec::kOneBit, Codec::kTopK}) {
    ChunkCodec c{k, 64, 41};
    std::vector<float> residual(n, 0.0f), decoded_sum(n, 0.0f), input_sum(n, 0.0f);
    for (uint32_t step = 0; step < 5; ++step) {
      auto x = Random(n, 100 + step);
      auto enc = EncodeAll(c, x, residual.data());
      auto y = DecodeAll(c, enc, n);
      for (uint64_t i = 0; i < n; ++i) {
        decoded_sum[i] += y[i];
        input_sum[i] += x[i];
      }
    }
    // Over steps: sum(decoded) + residual == sum(inputs), up to fp32 rounding.
    for (uint64_t i = 0; i < n; ++i)
      ASSERT_NEAR(decoded_sum[i] + residual[i], input_sum[i], 1e-4f * (1 + std::fabs(input_sum[i])))
          << CodecName(k) << " element " << i;
  }
}

TEST(TopK, SendsExactlyKOfTheLargestMagnitudes) {
  const uint64_t n = 10000;
  auto x = Random(n, 9);
  ChunkCodec c{Codec::kTopK, 0, 100};
  auto enc = EncodeAll(c, x);
  EXPECT_EQ(enc.size(), TopKBytes(100));
  auto y = DecodeAll(c, enc, n);
  std::vector<float> mags;
  uint64_t sent = 0;
  for (uint64_t i = 0; i < n; ++i) {
    mags.push_back(std::fabs(x[i]));
    if (y[i] != 0.0f) {
      ++sent;
      EXPECT_EQ(y[i], x[i]);
    }
  }
  EXPECT_EQ(sent, 100u);
  std::nth_element(mags.begin(), mags.begin() + 99, mags.end(), std::greater<float>());
  for (uint64_t i = 0; i < n; ++i)
    if (y[i] != 0.0f) {
      EXPECT_GE(std::fabs(x[i]), mags[99]);
    }
}

// Ties in magnitude go to the lower indices (the choice is repeatable); a NaN counts as the
// largest, so that it is sent rather than kept forever in the residual.
TEST(TopK, TiesGoToTheLowerIndicesAndNaNIsSent) {
  std::vector<float> x(100, 1.0f);
  for (size_t i = 0; i < x.size(); i += 2) x[i] = -1.0f;
  x[97] = std::numeric_limits<float>::quiet_NaN();
  x[50] = 3.0f;
  ChunkCodec c{Codec::kTopK, 0, 5};
  std::vector<float> residual(x.size(), 0.0f);
  auto enc = EncodeAll(c, x, residual.data());
  std::vector<uint32_t> idx(5);
  std::memcpy(idx.data(), enc.data() + 4, 20);
  EXPECT_EQ(idx, (std::vector<uint32_t>{0, 1, 2, 50, 97}));
  EXPECT_TRUE(std::isnan(DecodeAll(c, enc, x.size())[97]));
  EXPECT_EQ(residual[97], 0.0f);
  EXPECT_EQ(residual[3], 1.0f);  // not sent: kept for the next push
}

TEST(TopK, ATensorsChunksShareExactlyItsK) {
  Compression count{Codec::kTopK, 256, 0.01, 777, true};
  Compression ratio{Codec::kTopK, 256, 0.01, 0, true};
  const uint64_t n = 1000003;
  for (const auto& comp : {count, ratio}) {
    uint64_t total = 0;
    for (uint64_t off = 0; off < n; off += 65536)
      total += ForChunk(comp, n, off, std::min<uint64_t>(65536, n - off)).k;
    EXPECT_EQ(total, comp.count ? 777u : 10000u);
  }
}

// topk's share of a chunk is capped so that its encoding is never larger than the chunk in
// fp32 (sending more than half the elements as index and value costs more than dense).
TEST(TopK, AnEncodingNeverExceedsTheChunksFp32Bytes) {
  Compression all{Codec::kTopK, 256, 0.01, 1 << 30, true};  // more than every element
  for (uint64_t n : {1ull, 2ull, 3ull, 8ull, 1000ull}) {
    ChunkCodec c = ForChunk(all, n, 0, n);
    EXPECT_EQ(c.k, (n - 1) / 2) << n;
    EXPECT_LE(EncodedBytes(c, n), 4 * n) << n;
  }
}

TEST(Decode, AnyRangeAssignedOrAddedEqualsTheWholeDecode) {
  const uint64_t n = 5000;
  auto x = Random(n, 21);
  for (Codec k :
       {Codec::kNone, Codec::kFp16, Codec::kBf16, Codec::kInt8, Codec::kOneBit, Codec::kTopK}) {
    ChunkCodec c{k, 100, 300};
    auto enc = EncodeAll(c, x);
    auto whole = DecodeAll(c, enc, n);
    for (auto [lo, hi] :
         {std::pair<uint64_t, uint64_t>{0, 1}, {99, 101}, {1234, 4321}, {4999, 5000}}) {
      std::vector<float> part(hi - lo), added(hi - lo, 1.0f);
      DecodeRange(k, 100, enc.data(), n, lo, hi, part.data(), false);
      DecodeRange(k, 100, enc.data(), n, lo, hi, added.data(), true);
      for (uint64_t i = lo; i < hi; ++i) {
        ASSERT_EQ(part[i - lo], whole[i]) << CodecName(k) << " " << i;
        ASSERT_EQ(added[i - lo], 1.0f + whole[i]) << CodecName(k) << " " << i;
      }
    }
  }
}

// Regression (fuzz_codec: decode-of-zero-elements-memcpy-into-null): an empty range decodes to
// nothing, into a null destination.
TEST(Decode, AnEmptyRangeTouchesNothing) {
  for (Codec k :
       {Codec::kNone, Codec::kFp16, Codec::kBf16, Codec::kInt8, Codec::kOneBit, Codec::kTopK}) {
    ChunkCodec c{k, 4, 0};
    std::vector<uint8_t> enc(EncodedBytes(c, 0));
    if (k == Codec::kTopK) enc.assign(4, 0);
    EXPECT_TRUE(Check(k, 4, enc.data(), enc.size(), 0).ok()) << CodecName(k);
    DecodeRange(k, 4, enc.data(), 0, 0, 0, nullptr, false);
    DecodeRange(k, 4, enc.data(), 0, 0, 0, nullptr, true);
  }
  EncodeParams(Codec::kFp16, nullptr, 3, 3, nullptr);
}

TEST(Check, RefusesMalformedEncodings) {
  const uint64_t n = 20;
  auto x = Random(n, 5);
  auto expect_refused = [&](Codec k, uint32_t block, const std::vector<uint8_t>& e,
                            const std::string& says) {
    Status st = Check(k, block, e.data(), e.size(), n);
    EXPECT_TRUE(st.IsInvalidArgument()) << CodecName(k) << ": " << st.ToString();
    EXPECT_NE(st.message().find(says), std::string::npos) << st.message();
  };
  // Wrong lengths.
  for (Codec k : {Codec::kNone, Codec::kFp16, Codec::kBf16, Codec::kInt8, Codec::kOneBit}) {
    auto e = EncodeAll({k, 8, 0}, x);
    e.push_back(0);
    expect_refused(k, 8, e, "bytes");
    e.resize(e.size() - 2);
    expect_refused(k, 8, e, "bytes");
  }
  // NaN and negative scales.
  for (Codec k : {Codec::kInt8, Codec::kOneBit}) {
    auto e = EncodeAll({k, 8, 0}, x);
    float nan = std::numeric_limits<float>::quiet_NaN(), neg = -1.0f;
    std::memcpy(e.data() + 4, &nan, 4);
    expect_refused(k, 8, e, "scale");
    std::memcpy(e.data() + 4, &neg, 4);
    expect_refused(k, 8, e, "scale");
  }
  // onebit padding bits.
  {
    auto e = EncodeAll({Codec::kOneBit, 8, 0}, x);  // 20 elements: 4 padding bits
    e.back() |= 0x80;
    expect_refused(Codec::kOneBit, 8, e, "padding");
  }
  // topk: out of range, repeated, out of order, a count beyond the elements, a short tail.
  auto topk = EncodeAll({Codec::kTopK, 0, 3}, x);
  auto set_index = [&](std::vector<uint8_t> e, int j, uint32_t v) {
    std::memcpy(e.data() + 4 + 4 * j, &v, 4);
    return e;
  };
  uint32_t i0, i1;
  std::memcpy(&i0, topk.data() + 4, 4);
  std::memcpy(&i1, topk.data() + 8, 4);
  expect_refused(Codec::kTopK, 0, set_index(topk, 2, 20), "out of range");
  expect_refused(Codec::kTopK, 0, set_index(topk, 1, i0), "repeated");
  expect_refused(Codec::kTopK, 0, set_index(set_index(topk, 0, i1), 1, i0), "out of order");
  auto big = topk;
  uint32_t k = 21;
  std::memcpy(big.data(), &k, 4);
  expect_refused(Codec::kTopK, 0, big, "out of 20");
  auto shorter = topk;
  shorter.resize(topk.size() - 1);
  expect_refused(Codec::kTopK, 0, shorter, "bytes");
  EXPECT_TRUE(Check(Codec::kTopK, 0, topk.data(), topk.size(), n).ok());
}

// The CPU rule fed an encoding gives bit for bit what it gives fed the decoded fp32 values:
// Fold (assign, add), Apply with and without the extra sum, and parameters published as fp16.
TEST(CpuUpdateRule, DecodesEncodedGradientsIntoTheUpdateAsTheDecodedValues) {
  const uint64_t n = 70000;  // over several decode blocks
  OptimizerConfig adam;
  adam.kind = OptimizerKind::kAdam;
  adam.lr = 0.01f;
  auto x = Random(n, 77);
  auto p0 = Random(n, 78);
  auto extra = Random(n, 79);
  for (Codec k : {Codec::kFp16, Codec::kBf16, Codec::kInt8, Codec::kOneBit, Codec::kTopK}) {
    ChunkCodec c{k, 256, 700};
    auto enc = EncodeAll(c, x);
    auto dec = DecodeAll(c, enc, n);
    server::GradientView ge{enc.data(), enc.size(), n, server::Dtype::kFloat32, k, 256};
    server::GradientView gd{dec.data(), dec.size() * 4, n, server::Dtype::kFloat32, Codec::kNone,
                            256};
    server::GradientView ex{extra.data(), n * 4, n, server::Dtype::kFloat32, Codec::kNone, 256};
    auto a = server::MakeCpuUpdateRule(adam, n, nullptr, 0, "tensor 't' chunk 1");
    auto b = server::MakeCpuUpdateRule(adam, n, nullptr, 0, "tensor 't' chunk 1");
    ASSERT_TRUE(a->Check(ge).ok());
    std::vector<float> fa(n, 3.0f), fb(n, 3.0f);
    a->Fold(fa.data(), ge, true);
    b->Fold(fb.data(), gd, true);
    ASSERT_EQ(fa, fb);
    a->Fold(fa.data(), ge, false);
    b->Fold(fb.data(), gd, false);
    ASSERT_EQ(fa, fb);
    std::vector<float> pa = p0, pb = p0;
    std::vector<uint16_t> pub(n);
    server::Publish publish{pub.data(), Codec::kFp16};
    for (int step = 0; step < 2; ++step) {
      bool da = false, db = false;
      a->Apply(pa.data(), pa.data(), ge, step ? &ex : nullptr, 0.5f, std::nullopt, &publish,
               [&](Status st) { da = st.ok(); });
      b->Apply(pb.data(), pb.data(), gd, step ? &ex : nullptr, 0.5f, std::nullopt, nullptr,
               [&](Status st) { db = st.ok(); });
      ASSERT_TRUE(da && db);
      ASSERT_EQ(pa, pb) << CodecName(k) << " step " << step;
      for (uint64_t i = 0; i < n; i += 997) ASSERT_EQ(pub[i], FloatToHalf(pb[i]));
    }
    // A malformed push is refused with the chunk's name.
    auto bad = enc;
    bad.resize(enc.size() - 1);
    server::GradientView gb = ge;
    gb.data = bad.data();
    gb.bytes = bad.size();
    Status st = a->Check(gb);
    EXPECT_TRUE(st.IsInvalidArgument());
    EXPECT_NE(st.message().find("tensor 't' chunk 1"), std::string::npos) << st.message();
  }
}

}  // namespace
}  // namespace shardps::compress
