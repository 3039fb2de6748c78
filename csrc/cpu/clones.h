// RF_CLONES: build a function three times (AVX-512, AVX2, baseline x86-64) with GCC's
// target_clones, the CPU picking one at load time, so that one wheel runs anywhere and its plain
// loops use the vector width the machine has. Elsewhere (clang, other ISAs): one baseline build.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define RF_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define RF_CLONES
#endif
