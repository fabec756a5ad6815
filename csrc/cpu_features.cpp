// Run-time ISA choice. Each kernel path has a blocker: the features its translation unit
// is compiled for that this CPU (CPUID via __builtin_cpu_supports, which also checks the
// OS saves the vector state) lacks. detected_isa is the fastest path without one;
// QGNN_CPU_ISA (read once) or force_isa picks another, and naming an unknown or
// unrunnable path is an error, never a silent fallback.
#include <atomic>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <string>

#include "qgnn_cpu.h"

#if defined(__x86_64__)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace qgnn {

namespace {

constexpr const char* kNames[kIsaCount] = {"scalar", "avx2", "avxvnni", "avx512vnni", "amx"};

std::atomic<int> g_forced{-1};

#if defined(__x86_64__)
// the CPU features each path's target pragma enables, in __builtin_cpu_supports spelling
std::string missing_features(Isa isa) {
  __builtin_cpu_init();
  std::string miss;
  auto need = [&miss](bool have, const char* name) {
    if (!have) miss += (miss.empty() ? "" : ", ") + std::string(name);
  };
  switch (isa) {
    case Isa::Avx512Vnni:
      need(__builtin_cpu_supports("avx512f"), "avx512f");
      need(__builtin_cpu_supports("avx512bw"), "avx512bw");
      need(__builtin_cpu_supports("avx512vl"), "avx512vl");
      need(__builtin_cpu_supports("avx512dq"), "avx512dq");
      need(__builtin_cpu_supports("avx512vnni"), "avx512vnni");
      need(__builtin_cpu_supports("bmi2"), "bmi2");
      break;
    case Isa::AvxVnni:
      need(__builtin_cpu_supports("avxvnni"), "avxvnni");
      break;
    default:
      break;
  }
  need(__builtin_cpu_supports("avx2"), "avx2");
  need(__builtin_cpu_supports("fma"), "fma");
  return miss;
}

uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<uint64_t>(hi) << 32) | lo;
}
#endif

std::string compute_blocker(Isa isa) {
  if (isa == Isa::Scalar) return "";
#if defined(__x86_64__)
  if (isa == Isa::Amx) {
    const std::string hw = amx_blocker(probe_amx());
    if (!hw.empty()) return hw;
    const std::string miss = missing_features(Isa::Avx512Vnni);  // the tile's epilogue
    return miss.empty() ? "" : "the CPU has AMX-INT8 but lacks " + miss;
  }
  const std::string miss = missing_features(isa);
  return miss.empty() ? "" : "the CPU lacks " + miss;
#else
  return "not an x86-64 build";
#endif
}

const std::string& blocker_ref(Isa isa) {
  static const struct Table {
    std::string why[kIsaCount];
    Table() {
      for (int i = 0; i < kIsaCount; ++i) why[i] = compute_blocker(static_cast<Isa>(i));
    }
  } table;
  return table.why[static_cast<int>(isa)];
}

std::string valid_names() {
  std::string s = "auto";
  for (const char* n : kNames) s += std::string(", ") + n;
  return s;
}

std::string runnable_names() {
  std::string s;
  for (int i = 0; i < kIsaCount; ++i)
    if (blocker_ref(static_cast<Isa>(i)).empty()) s += (s.empty() ? "" : ", ") + std::string(kNames[i]);
  return s;
}

void require_runnable(Isa isa, const std::string& what) {
  const std::string& why = blocker_ref(isa);
  if (!why.empty())
    throw IsaUnavailable(what + " cannot run here: " + why + "; this CPU runs " + runnable_names());
}

// QGNN_CPU_ISA, parsed and checked once: the chosen path (-1: auto) or the error to raise
struct EnvChoice {
  int isa = -1;
  bool unknown = false;
  std::string error;
};

const EnvChoice& env_choice() {
  static const EnvChoice choice = [] {
    EnvChoice c;
    const char* s = std::getenv("QGNN_CPU_ISA");
    if (!s) return c;
    try {
      c.isa = isa_from_name(s);
      if (c.isa >= 0) require_runnable(static_cast<Isa>(c.isa), std::string("QGNN_CPU_ISA=") + s);
    } catch (const ArgError& e) {
      c.unknown = true;
      c.error = std::string("QGNN_CPU_ISA: ") + e.what();
    } catch (const IsaUnavailable& e) {
      c.error = e.what();
    }
    return c;
  }();
  return choice;
}

}  // namespace

const char* isa_name(Isa isa) { return kNames[static_cast<int>(isa)]; }

int isa_from_name(const std::string& name) {
  if (name.empty() || name == "auto") return -1;
  for (int i = 0; i < kIsaCount; ++i)
    if (name == kNames[i]) return i;
  throw ArgError("unknown ISA '" + name + "'; choose one of " + valid_names() + " (this CPU runs " +
                 runnable_names() + ")");
}

std::string isa_blocker(Isa isa) { return blocker_ref(isa); }

Isa detected_isa() {
  static const Isa best = [] {
    int i = kIsaCount - 1;
    while (i > 0 && !blocker_ref(static_cast<Isa>(i)).empty()) --i;
    return static_cast<Isa>(i);
  }();
  return best;
}

Isa active_isa() {
  const int forced = g_forced.load();
  if (forced >= 0) return static_cast<Isa>(forced);
  const EnvChoice& env = env_choice();
  if (!env.error.empty()) {
    if (env.unknown) throw ArgError(env.error);
    throw IsaUnavailable(env.error);
  }
  return env.isa >= 0 ? static_cast<Isa>(env.isa) : detected_isa();
}

void force_isa(int isa) {
  if (isa < -1 || isa >= kIsaCount) throw ArgError("isa index out of range: " + std::to_string(isa));
  if (isa >= 0) require_runnable(static_cast<Isa>(isa), std::string("isa '") + kNames[isa] + "'");
  g_forced.store(isa);
}

// ------------------------------------------------------------------ AMX

namespace {

// every check but the permission: CPUID, the OS-enabled state, the palette
std::string amx_hardware_blocker(const AmxProbe& p) {
  if (p.max_leaf < 7 || !(p.leaf7_edx >> 24 & 1))
    return "the CPU has no AMX (CPUID.(EAX=7,ECX=0):EDX[24] AMX-TILE is clear)";
  if (!(p.leaf7_edx >> 25 & 1)) return "the CPU has AMX tiles but no AMX-INT8 (CPUID.(EAX=7,ECX=0):EDX[25] is clear)";
  if (!p.osxsave) return "the OS has not enabled XSAVE (CPUID.1:ECX[27] is clear), so no tile state";
  if ((p.xcr0 >> 17 & 3) != 3)
    return "the OS does not enable the AMX tile state (XCR0 bits 17 XTILECFG / 18 XTILEDATA are not both set)";
  if (p.max_leaf < 0x1D || p.palettes < 1) return "CPUID leaf 0x1D reports no tile palette 1";
  const uint32_t bytes_per_row = p.pal1_ebx & 0xFFFF, names = p.pal1_ebx >> 16, rows = p.pal1_ecx & 0xFFFF;
  if (bytes_per_row < 64 || rows < 16 || names < 8)
    return "tile palette 1 has " + std::to_string(names) + " tiles of " + std::to_string(rows) + " rows x " +
           std::to_string(bytes_per_row) + " bytes; int8 tiles need 8 of 16 x 64";
  return "";
}

}  // namespace

std::string amx_blocker(const AmxProbe& p) {
  std::string why = amx_hardware_blocker(p);
  if (!why.empty()) return why;
  if (p.perm_errno < 0) return "the AMX tile-data permission was not requested";
  if (p.perm_errno > 0)
    return std::string("the kernel refused the AMX tile-data permission (arch_prctl(ARCH_REQ_XCOMP_PERM, "
                       "XFEATURE_XTILEDATA): ") + std::strerror(p.perm_errno) + "; Linux >= 5.16 grants it)";
  return "";
}

AmxProbe probe_amx() {
  static const AmxProbe probe = [] {
    AmxProbe p;
#if defined(__x86_64__)
    unsigned a, b, c, d;
    p.max_leaf = __get_cpuid_max(0, nullptr);
    if (p.max_leaf >= 1 && __get_cpuid(1, &a, &b, &c, &d)) p.osxsave = c >> 27 & 1;
    if (p.max_leaf >= 7) {
      __cpuid_count(7, 0, a, b, c, d);
      p.leaf7_edx = d;
    }
    if (p.osxsave) p.xcr0 = xgetbv0();
    if (p.max_leaf >= 0x1D) {
      __cpuid_count(0x1D, 0, a, b, c, d);
      p.palettes = a;
      if (p.palettes >= 1) {
        __cpuid_count(0x1D, 1, a, b, c, d);
        p.pal1_eax = a;
        p.pal1_ebx = b;
        p.pal1_ecx = c;
      }
    }
    // asked only when the hardware has usable tiles (once per process: a static)
    if (amx_hardware_blocker(p).empty()) {
#if defined(__linux__)
      constexpr long kArchReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
      p.perm_errno = syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0 ? 0 : errno;
#else
      p.perm_errno = ENOSYS;
#endif
    }
#endif
    return p;
  }();
  return probe;
}

}  // namespace qgnn
