// The emulator's own tests: small kernels, each with one bug (or none) that a GPU would
// execute silently or hang on, run under the emulator. No torch here (the sanitizer builds run
// them from a plain C++ driver, tests/emu/driver.cpp).
#pragma once

#include <string>
#include <vector>

namespace rf::emu {

// The self-tests by name; each name says what the emulator must report ("ok_*": nothing).
std::vector<std::string> selftest_names();

// Runs one; returns the emulator's error message, empty if the launch passed.
std::string run_selftest(const std::string& name);

}  // namespace rf::emu
