// The compile-time epilogue flags shared by the zmm (qgemm_zmm.h) and ymm (qgemm_ymm.h)
// epilogues: which terms of ref_epilogue a layer's epilogue has, so that the common
// folded-layer epilogues compile straight-line. ISA-neutral; internal linkage, like the
// headers that include it (one copy per ISA translation unit: ODR).
#pragma once

namespace qgnn {
namespace {

// F: compile-time epilogue flags (kPS | kSH | ...), or -1 to read them from Epi at run time.
constexpr int kPS = 1, kSH = 2, kRES = 4, kSLOPE = 8, kQUANT = 16, kASFIRST = 32, kACC = 64, kZREM = 128, kCENT = 256;
// the folded layers' epilogues (BN + LeakyReLU to codes; BN only; BN + LeakyReLU; BN +
// residual + LeakyReLU, to fp32 or codes), compiled with their flags known; any other
// combination reads them. kZREM (code outputs of a snapped layer): y = c1*ACC' alone,
// since its remainder terms are signed zeros (Epi::zero_rem); kCENT: the tile's sums come
// with the weights' zero points taken out already (Epi::centred, the AVX-512 paths)
constexpr int kConvBnLrelu = kPS | kSH | kSLOPE | kQUANT;
constexpr int kBn = kPS | kSH, kBnLrelu = kPS | kSH | kSLOPE, kBnResLrelu = kPS | kSH | kRES | kSLOPE;
constexpr int kBnResLreluQuant = kBnResLrelu | kQUANT;
// whether an epilogue of flags F has flag: a constant for F >= 0, else rt (read at run time)
#define EPI_HAS(F, flag, rt) ((F) < 0 ? (rt) : ((F) & (flag)) != 0)

inline int epi_flags(const Epi& e) {
  return (e.post_scale ? kPS : 0) | (e.post_shift ? kSH : 0) | (e.residual ? kRES : 0) | (e.has_slope ? kSLOPE : 0) |
         (e.rq.nq ? kQUANT : 0) | (e.as_first ? kASFIRST : 0) | (e.acc_out ? kACC : 0) |
         (e.zero_rem ? kZREM : 0) | (e.centred ? kCENT : 0);
}

// Calls body(EpiF<F>{}) with F the compiled flag set of e's epilogue (-1: read at run time).
// C: kCENT for the tiles that take centred weights (AVX-512), else 0: the others' Epi is
// never centred, so they compile no centred variants.
template <int F>
struct EpiF {
  static constexpr int value = F;
};
template <int C = 0, class Body>
inline void with_epi_flags(const Epi& e, Body&& body) {
  static_assert(C == 0 || C == kCENT, "C: 0 or kCENT");
  const int flags = epi_flags(e);
  if constexpr (C != 0) {
    switch (flags) {
      case kConvBnLrelu | C: return body(EpiF<kConvBnLrelu | C>{});
      case kBn | C: return body(EpiF<kBn | C>{});
      case kBnLrelu | C: return body(EpiF<kBnLrelu | C>{});
      case kBnResLrelu | C: return body(EpiF<kBnResLrelu | C>{});
      case kBnResLreluQuant | C: return body(EpiF<kBnResLreluQuant | C>{});
      case kConvBnLrelu | kZREM | C: return body(EpiF<kConvBnLrelu | kZREM | C>{});
      case kBnResLreluQuant | kZREM | C: return body(EpiF<kBnResLreluQuant | kZREM | C>{});
      default: break;
    }
  }
  switch (flags) {
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
