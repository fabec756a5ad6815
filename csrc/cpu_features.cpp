// Run-time ISA choice: CPUID via __builtin_cpu_supports, overridable by QGNN_CPU_ISA
// (scalar | avx2 | avx512vnni) or force_isa() for tests. A forced ISA above what the CPU
// has is clamped down, so forcing can never execute an illegal instruction.
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "qgnn_cpu.h"

namespace qgnn {

static std::atomic<int> g_forced{-1};

Isa detected_isa() {
#if defined(__x86_64__) || defined(__i386__)
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni"))
      return Isa::Avx512Vnni;
    if (__builtin_cpu_supports("avx2")) return Isa::Avx2;
    return Isa::Scalar;
  }();
  return isa;
#else
  return Isa::Scalar;
#endif
}

static int env_isa() {
  const char* s = std::getenv("QGNN_CPU_ISA");
  if (!s || !*s) return -1;
  if (!std::strcmp(s, "scalar")) return 0;
  if (!std::strcmp(s, "avx2")) return 1;
  if (!std::strcmp(s, "avx512vnni") || !std::strcmp(s, "avx512")) return 2;
  return -1;  // unknown values mean "auto"; the Python side warns
}

Isa active_isa() {
  int want = g_forced.load();
  if (want < 0) want = env_isa();
  const int have = static_cast<int>(detected_isa());
  if (want < 0 || want > have) want = have;
  return static_cast<Isa>(want);
}

void force_isa(int isa) {
  if (isa < -1 || isa > 2) throw ArgError("isa must be -1 (auto), 0 (scalar), 1 (avx2) or 2 (avx512vnni)");
  g_forced.store(isa);
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512Vnni: return "avx512vnni";
    case Isa::Avx2: return "avx2";
    default: return "scalar";
  }
}

}  // namespace qgnn
