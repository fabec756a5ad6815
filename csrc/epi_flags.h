// The compile-time epilogue flags shared by the zmm (qgemm_zmm.h) and ymm (qgemm_ymm.h)
// epilogues: which terms of ref_epilogue a layer's epilogue has, so that the common
// folded-layer epilogues compile straight-line. ISA-neutral; internal linkage, like the
// headers that include it (one copy per ISA translation unit: ODR).
#pragma once

namespace qgnn {
namespace {

// F: compile-time epilogue flags (kPS | kSH | ...), or -1 to read them from Epi at run time.
constexpr int kPS = 1, kSH = 2, kRES = 4, kSLOPE = 8, kQUANT = 16, kASFIRST = 32, kACC = 64, kZREM = 128, kCENT = 256,
              kFUSED = 512;
// the folded layers' epilogues (BN + LeakyReLU to codes; BN only; BN + LeakyReLU; BN +
// residual + LeakyReLU, to fp32 or codes), compiled with their flags known; any other
// combination reads them. kZREM (code outputs of a snapped layer): y = c1*ACC' alone,
// since its remainder terms are signed zeros (Epi::zero_rem); kCENT: the tile's sums come
// with the weights' zero points taken out already (Epi::centred, the AVX-512 paths);
// kFUSED: the code outputs by the fused epilogue (Epi::fz, the AVX-512 paths)
constexpr int kConvBnLrelu = kPS | kSH | kSLOPE | kQUANT;
constexpr int kBn = kPS | kSH, kBnLrelu = kPS | kSH | kSLOPE, kBnResLrelu = kPS | kSH | kRES | kSLOPE;
constexpr int kBnResLreluQuant = kBnResLrelu | kQUANT;
// whether an epilogue of flags F has flag: a constant for F >= 0, else rt (read at run time)
#define EPI_HAS(F, flag, rt) ((F) < 0 ? (rt) : ((F) & (flag)) != 0)

inline int epi_flags(const Epi& e) {
  return (e.post_scale ? kPS : 0) | (e.post_shift ? kSH : 0) | (e.residual ? kRES : 0) | (e.has_slope ? kSLOPE : 0) |
         (e.rq.nq ? kQUANT : 0) | (e.as_first ? kASFIRST : 0) | (e.acc_out ? kACC : 0) |
         (e.zero_rem ? kZREM : 0) | (e.centred ? kCENT : 0) | (e.fz.c1 ? kFUSED : 0);
}

// Calls body(EpiF<F>{}) with F the compiled flag set of e's epilogue (-1: read at run time).
// C: the optional flags the calling tile takes, kCENT and / or kFUSED (the AVX-512 tiles);
// the others ignore both (their Epi is never centred, and they run the reference's order),
// so they compile no such variants.
template <int F>
struct EpiF {
  static constexpr int value = F;
};
template <int C = 0, class Body>
inline void with_epi_flags(const Epi& e, Body&& body) {
  static_assert((C & ~(kCENT | kFUSED)) == 0, "C: kCENT and / or kFUSED");
  const int flags = epi_flags(e) & ~(kFUSED & ~C);
  // kFUSED: code outputs with remainder terms only (fuse_epilogue)
  if constexpr (C == (kCENT | kFUSED)) {
    switch (flags) {
      case kConvBnLrelu | kFUSED | kCENT: return body(EpiF<kConvBnLrelu | kFUSED | kCENT>{});
      case kBnResLreluQuant | kFUSED | kCENT: return body(EpiF<kBnResLreluQuant | kFUSED | kCENT>{});
      default: break;
    }
  }
  if constexpr ((C & kFUSED) != 0) {
    switch (flags) {
      case kConvBnLrelu | kFUSED: return body(EpiF<kConvBnLrelu | kFUSED>{});
      case kBnResLreluQuant | kFUSED: return body(EpiF<kBnResLreluQuant | kFUSED>{});
      default: break;
    }
  }
  if constexpr ((C & kCENT) != 0) {
    switch (flags & ~kFUSED) {
      case kConvBnLrelu | kCENT: return body(EpiF<kConvBnLrelu | kCENT>{});
      case kBn | kCENT: return body(EpiF<kBn | kCENT>{});
      case kBnLrelu | kCENT: return body(EpiF<kBnLrelu | kCENT>{});
      case kBnResLrelu | kCENT: return body(EpiF<kBnResLrelu | kCENT>{});
      case kBnResLreluQuant | kCENT: return body(EpiF<kBnResLreluQuant | kCENT>{});
      case kConvBnLrelu | kZREM | kCENT: return body(EpiF<kConvBnLrelu | kZREM | kCENT>{});
      case kBnResLreluQuant | kZREM | kCENT: return body(EpiF<kBnResLreluQuant | kZREM | kCENT>{});
      default: break;
    }
  }
  switch (flags & ~kFUSED) {
    case kConvBnLrelu: body(EpiF<kConvBnLrelu>{}); break;
    case kBn: body(EpiF<kBn>{}); break;
    case kBnLrelu: body(EpiF<kBnLrelu>{}); break;
    case kBnResLrelu: body(EpiF<kBnResLrelu>{}); break;
    case kBnResLreluQuant: body(EpiF<kBnResLreluQuant>{}); break;
    case kConvBnLrelu | kZREM: body(EpiF<kConvBnLrelu | kZREM>{}); break;
    case kBnResLreluQuant | kZREM: body(EpiF<kBnResLreluQuant | kZREM>{}); break;
    default: body(EpiF<-1>{}); break;
  }
}

}  // namespace
}  // namespace qgnn
