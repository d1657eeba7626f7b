// Element-wise loops that the server runs over every pushed byte are compiled twice on x86-64:
// for x86-64-v3 (AVX2) and for the baseline, picked at load time (ifunc). Both clones compute
// the same bits: the build does not contract a*b+c into FMA (ISO C++ mode), and sqrt and
// division are correctly rounded in both.
#pragma once

// Not under ThreadSanitizer: an ifunc resolver runs during relocation, before the TSan runtime
// is set up, and the instrumented binary crashes before main (seen in CI's TSan build).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__CUDACC__) && !defined(__clang__) && \
    !defined(__SANITIZE_THREAD__)
#define SHARDPS_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define SHARDPS_VECTOR_CLONES
#endif
