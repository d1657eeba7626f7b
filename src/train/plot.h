// Training curves as a PNG, drawn by the gnuplot program.
#pragma once

#include <string>
#include <vector>

#include "shardps/status.h"

namespace shardps::train {

struct EpochPoint {
  int epoch;
  double train_loss;
  double test_accuracy;  // a fraction in [0, 1]
};

// Writes a PNG with two panels, training loss per epoch and test accuracy per epoch, showing
// `run` and, when non-empty, `baseline` as separate lines. Runs `gnuplot` (Debian package
// gnuplot-nox); NotFound if it is not installed, IOError if it fails or writes no file.
Status WritePlot(const std::string& png_path, const std::vector<EpochPoint>& run,
                 const std::vector<EpochPoint>& baseline, const std::string& title);

// Runs gnuplot on `script`, which must write the PNG `png_path` (set output to it); IOError
// naming gnuplot's messages if it fails or writes no file, NotFound if gnuplot is missing.
Status DrawPng(const std::string& png_path, const std::string& script);

// `s` as a gnuplot single-quoted string literal.
std::string GnuplotQuote(const std::string& s);

}  // namespace shardps::train
