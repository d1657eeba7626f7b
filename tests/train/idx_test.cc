#include "train/idx.h"

#include <unistd.h>
#include <zlib.h>

#include <chrono>
#include <filesystem>
#include <fstream>
#include <random>

#include <gtest/gtest.h>

namespace shardps::train {
namespace {

namespace fs = std::filesystem;

void PutU32(std::vector<uint8_t>* b, uint32_t v) {
  for (int shift = 24; shift >= 0; shift -= 8) b->push_back(static_cast<uint8_t>(v >> shift));
}

// 3 images of 2x2 with pixels 0, 20, 40, ...; labels 7, 0, 9.
std::vector<uint8_t> GoodImages() {
  std::vector<uint8_t> b;
  for (uint32_t v : {0x803u, 3u, 2u, 2u}) PutU32(&b, v);
  for (int i = 0; i < 12; ++i) b.push_back(static_cast<uint8_t>(i * 20 + (i == 11 ? 35 : 0)));
  return b;
}

std::vector<uint8_t> GoodLabels() {
  std::vector<uint8_t> b;
  for (uint32_t v : {0x801u, 3u}) PutU32(&b, v);
  for (uint8_t l : {7, 0, 9}) b.push_back(l);
  return b;
}

class IdxTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const auto stamp = std::chrono::steady_clock::now().time_since_epoch().count();
    dir_ = fs::temp_directory_path() /
           ("shardps_idx_test_" + std::to_string(::getpid()) + "_" + std::to_string(stamp) + "_" +
            std::to_string(std::random_device{}()));
    fs::create_directories(dir_);
  }
  void TearDown() override {
    std::error_code ec;
    fs::remove_all(dir_, ec);
  }

  std::string Write(const std::string& name, const std::vector<uint8_t>& bytes) {
    const std::string path = (dir_ / name).string();
    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
    return path;
  }

  std::string WriteGzip(const std::string& name, const std::vector<uint8_t>& bytes) {
    const std::string path = (dir_ / name).string();
    gzFile f = gzopen(path.c_str(), "wb");
    EXPECT_NE(f, nullptr);
    EXPECT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())),
              static_cast<int>(bytes.size()));
    EXPECT_EQ(gzclose(f), Z_OK);
    return path;
  }

  static void ExpectGood(const Dataset& d) {
    EXPECT_EQ(d.rows, 2);
    EXPECT_EQ(d.cols, 2);
    ASSERT_EQ(d.size(), 3u);
    ASSERT_EQ(d.images.size(), 12u);
    const std::vector<uint8_t> raw = GoodImages();
    for (size_t i = 0; i < 12; ++i) EXPECT_EQ(d.images[i], raw[16 + i] / 255.0f) << i;
    EXPECT_EQ(d.images[0], 0.0f);
    EXPECT_EQ(d.images[11], 1.0f);
    EXPECT_EQ(d.labels, (std::vector<uint8_t>{7, 0, 9}));
  }

  fs::path dir_;
};

TEST_F(IdxTest, ReadsPlainFiles) {
  Dataset d;
  auto images = ReadMaybeGzip(Write("img", GoodImages()));
  ASSERT_TRUE(images.ok()) << images.status().ToString();
  ASSERT_TRUE(ParseIdxImages(*images, "img", &d).ok());
  auto labels = ReadMaybeGzip(Write("lbl", GoodLabels()));
  ASSERT_TRUE(labels.ok()) << labels.status().ToString();
  ASSERT_TRUE(ParseIdxLabels(*labels, "lbl", &d).ok());
  ExpectGood(d);
}

TEST_F(IdxTest, ReadsGzipFilesTheSame) {
  auto plain = ReadMaybeGzip(Write("img", GoodImages()));
  auto gz = ReadMaybeGzip(WriteGzip("img.gz", GoodImages()));
  ASSERT_TRUE(plain.ok() && gz.ok()) << gz.status().ToString();
  EXPECT_EQ(*plain, *gz);
  EXPECT_EQ(*gz, GoodImages());
}

TEST_F(IdxTest, TruncatedFile) {
  std::vector<uint8_t> b = GoodImages();
  b.resize(b.size() - 1);
  Dataset d;
  Status s = ParseIdxImages(b, "short.idx", &d);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("truncated"), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("short.idx"), std::string::npos) << s.ToString();
  EXPECT_EQ(d.rows, 0);  // untouched
  EXPECT_TRUE(d.images.empty());

  std::vector<uint8_t> l = GoodLabels();
  l.pop_back();
  s = ParseIdxLabels(l, "short-labels", &d);
  EXPECT_NE(s.message().find("truncated"), std::string::npos) << s.ToString();
}

TEST_F(IdxTest, WrongMagic) {
  Dataset d;
  Status s = ParseIdxImages(GoodLabels(), "labels-as-images", &d);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("magic"), std::string::npos) << s.ToString();
  EXPECT_NE(s.message().find("0x00000803"), std::string::npos) << s.ToString();
  s = ParseIdxLabels(GoodImages(), "images-as-labels", &d);
  EXPECT_NE(s.message().find("magic"), std::string::npos) << s.ToString();
}

TEST_F(IdxTest, NeverCrashesOnGarbage) {
  std::mt19937 rng(1);
  Dataset d;
  for (size_t len = 0; len < 40; ++len) {
    std::vector<uint8_t> b(len);
    for (auto& v : b) v = static_cast<uint8_t>(rng());
    EXPECT_FALSE(ParseIdxImages(b, "garbage", &d).ok());
    EXPECT_FALSE(ParseIdxLabels(b, "garbage", &d).ok());
  }
  // A valid magic with absurd dimensions must not try to allocate them.
  std::vector<uint8_t> huge;
  for (uint32_t v : {0x803u, 0xffffffffu, 0xffffffffu, 0xffffffffu}) PutU32(&huge, v);
  EXPECT_FALSE(ParseIdxImages(huge, "huge", &d).ok());
  huge.clear();
  for (uint32_t v : {0x803u, 1000u, 28u, 28u}) PutU32(&huge, v);
  Status s = ParseIdxImages(huge, "huge", &d);
  EXPECT_NE(s.message().find("truncated"), std::string::npos) << s.ToString();
  // Trailing bytes are an error too.
  std::vector<uint8_t> longer = GoodLabels();
  longer.push_back(1);
  EXPECT_FALSE(ParseIdxLabels(longer, "long", &d).ok());
}

TEST_F(IdxTest, MissingFile) {
  auto r = ReadMaybeGzip((dir_ / "nope").string());
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsNotFound()) << r.status().ToString();
  EXPECT_NE(r.status().message().find("nope"), std::string::npos);
}

TEST_F(IdxTest, CorruptGzipIsAnError) {
  const std::string path = WriteGzip("img.gz", GoodImages());
  auto bytes = ReadMaybeGzip(path);
  ASSERT_TRUE(bytes.ok());
  std::ifstream in(path, std::ios::binary);
  std::vector<uint8_t> gz((std::istreambuf_iterator<char>(in)), {});
  gz.resize(gz.size() / 2);
  auto r = ReadMaybeGzip(Write("cut.gz", gz));
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("cut.gz"), std::string::npos) << r.status().ToString();
}

TEST_F(IdxTest, LoadFashionMnistFromDir) {
  // The same tiny split for train (gzip) and test (plain).
  WriteGzip("train-images-idx3-ubyte.gz", GoodImages());
  WriteGzip("train-labels-idx1-ubyte.gz", GoodLabels());
  Write("t10k-images-idx3-ubyte", GoodImages());
  Write("t10k-labels-idx1-ubyte", GoodLabels());
  auto r = LoadFashionMnist(dir_.string());
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  ExpectGood(r->first);
  ExpectGood(r->second);

  // A label >= 10 is rejected.
  std::vector<uint8_t> bad = GoodLabels();
  bad.back() = 10;
  Write("t10k-labels-idx1-ubyte", bad);
  r = LoadFashionMnist(dir_.string());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("out of range"), std::string::npos);

  // Image and label counts must agree.
  bad = GoodLabels();
  bad[7] = 2;
  bad.pop_back();
  Write("t10k-labels-idx1-ubyte", bad);
  r = LoadFashionMnist(dir_.string());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.status().message().find("2 labels"), std::string::npos) << r.status().ToString();

  // A missing file names itself and gives the install hint.
  fs::remove(dir_ / "t10k-labels-idx1-ubyte");
  r = LoadFashionMnist(dir_.string());
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsNotFound());
  EXPECT_NE(r.status().message().find("t10k-labels-idx1-ubyte"), std::string::npos);
  EXPECT_NE(r.status().message().find("dataset-fashion-mnist"), std::string::npos);
}

TEST_F(IdxTest, MissingDirectoryGivesInstallHint) {
  auto r = LoadFashionMnist((dir_ / "does-not-exist").string());
  ASSERT_FALSE(r.ok());
  EXPECT_TRUE(r.status().IsNotFound()) << r.status().ToString();
  EXPECT_NE(r.status().message().find("dataset-fashion-mnist"), std::string::npos);
  EXPECT_NE(r.status().message().find("--data-dir"), std::string::npos);
}

TEST(FashionMnist, LoadsInstalledDataset) {
  if (!fs::is_directory(kDefaultFashionMnistDir)) {
    GTEST_SKIP() << kDefaultFashionMnistDir
                 << " does not exist (apt-get install dataset-fashion-mnist)";
  }
  auto r = LoadFashionMnist(kDefaultFashionMnistDir);
  ASSERT_TRUE(r.ok()) << r.status().ToString();
  const auto& [train, test] = *r;
  EXPECT_EQ(train.size(), 60000u);
  EXPECT_EQ(test.size(), 10000u);
  EXPECT_EQ(train.rows, 28);
  EXPECT_EQ(train.cols, 28);
  EXPECT_EQ(test.rows, 28);
  EXPECT_EQ(test.cols, 28);
  EXPECT_EQ(train.images.size(), 60000u * 28 * 28);
  EXPECT_EQ(test.labels.size(), 10000u);
  float lo = 1, hi = 0;
  for (float v : train.images) {
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  EXPECT_EQ(lo, 0.0f);
  EXPECT_EQ(hi, 1.0f);
  std::vector<int> per_class(10);
  for (uint8_t l : train.labels) ++per_class[l];
  for (int c : per_class) EXPECT_EQ(c, 6000);  // Fashion-MNIST is balanced
}

}  // namespace
}  // namespace shardps::train
