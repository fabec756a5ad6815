"""The ``cpu`` backend: packed-int C++ kernels (``qgnn_deploy._C``, sources in ``csrc/``).

Every ``cpu_*`` op takes exactly the arguments of its ``ref_*`` twin in
:mod:`qgnn_deploy.ops.reference` and returns the same dtype and shape: integer
accumulators identical to the reference, fp32 outputs equal to it (the epilogue runs in
the reference's order, compiled with ``-ffp-contract=off``), output codes identical
except rare fp32 ties.

Differences from the reference, on purpose:

* inputs must be CPU tensors; non-contiguous ones are copied to contiguous first (as
  the reference accepts them). The raw binding ``qgnn_deploy._C`` itself never copies:
  it raises on non-contiguous, misaligned or wrongly typed arrays. Wrong dtypes, shapes
  and bits raise :class:`~qgnn_deploy.errors.KernelArgumentError` here too;
* ``w_scale`` must be > 0 (the reference would divide by zero in its zero-point split);
* the weight repack (canonical stream -> 64-column int8 blocks) happens once per weight
  tensor and is cached (see ``_PackCache``: keyed on the storage address and geometry,
  weakly tied to the tensor, invalidated by in-place edits through ``_version``).
  :func:`cpu_prepack` gives the packed object explicitly; ``cpu_qlinear`` /
  ``cpu_qconv2d`` accept it in place of ``w_packed``.

Kernels: implicit-GEMM conv reading NHWC codes in place (one row pointer per kernel
tap), 6 x 64 register tiles of ``vpdpbusd`` on zmm (AVX-512 VNNI), 6 x 16 of ``vpdpbusd``
on ymm (AVX-VNNI, for CPUs without AVX-512) or 4 x 16 of ``vpmaddubsw`` + ``vpmaddwd``
(AVX2), a scalar path; row sums / border tables outside the inner loop;
the epilogue fused into the store. 2-bit codes run on the same int8 VNNI path: on the
development CPU it measured faster than bit-serial popcount and vpshufb lookup-table
inner loops (``bench/w2a2_microbench.cpp``).

Threads: ``torch.get_num_threads()`` unless :func:`set_num_threads` (or the environment
variable ``QGNN_CPU_THREADS``) sets a count; small ops run on one thread regardless.
The worker threads poll for the next op for ``QGNN_CPU_SPIN_US`` microseconds (default
200, 0 = never) before they sleep, and for as long as a compiled-plan run lasts:
consecutive layers then start without a wake-up. A value of either variable that is not
an integer in range is an error naming it.
Instruction set: the fastest of :data:`ISAS` this CPU runs, detected at run time;
``QGNN_CPU_ISA=auto|scalar|avx2|avxvnni|avx512vnni|amx`` or :func:`force_isa` forces one.
An unknown name, or a path this CPU cannot run, is an error naming the valid ones and
what the CPU has (:func:`isa_blocker`), never a silent fallback. ``amx`` runs the GEMMs
with K >= 256 codes on AMX-INT8 tiles and the rest on the AVX-512 path
(:func:`amx_probe` shows the detection registers).
"""
from __future__ import annotations

import os
import threading
import weakref
from typing import Optional, Tuple

import torch

from ..errors import BackendUnavailableError, InputError, KernelArgumentError

Tensor = torch.Tensor

_ext_mod = None
_threads_override: Optional[int] = None


def _env_int(name: str, lo: int, hi: int) -> Optional[int]:
    """The integer in environment variable ``name`` (None when unset or empty); a value
    that is not an integer in [lo, hi] is a KernelArgumentError naming it."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or not lo <= int(raw) <= hi:
        raise KernelArgumentError(f"{name}={raw!r}: expected an integer in {lo} .. {hi}")
    return int(raw)


def _ext():
    """The compiled extension, imported on first use (after checking the environment
    values it reads itself: QGNN_CPU_SPIN_US)."""
    global _ext_mod
    if _ext_mod is None:
        _env_int("QGNN_CPU_SPIN_US", 0, 1_000_000)
        try:
            from .. import _C  # noqa: PLC0415
        except ImportError as e:  # pragma: no cover - depends on the install
            raise BackendUnavailableError(
                "the cpu backend needs the C++ extension qgnn_deploy._C, which is not built "
                f"({e}); build it with `pip install -e .` (or `python setup.py build_ext --inplace`)"
            ) from None
        _ext_mod = _C
    return _ext_mod


def is_available() -> bool:
    try:
        _ext()
        return True
    except BackendUnavailableError:
        return False


def set_num_threads(n: Optional[int]) -> None:
    """Threads for the cpu kernels; ``None`` follows ``torch.get_num_threads()``."""
    global _threads_override
    if n is not None and (not isinstance(n, int) or n < 1):
        raise KernelArgumentError(f"thread count must be a positive int, got {n!r}")
    _threads_override = n


def get_num_threads() -> int:
    if _threads_override is not None:
        return _threads_override
    env = _env_int("QGNN_CPU_THREADS", 1, 1024)
    return env if env is not None else max(1, torch.get_num_threads())


#: how long :func:`wake_workers` keeps the woken workers polling: longer than an episode's
#: input checks after idle time (~0.3 ms measured), short enough not to matter on a failed call
WAKE_HOLD_US = 2000


def wake_workers() -> int:
    """Wake the kernels' sleeping worker threads now (they poll for :data:`WAKE_HOLD_US`):
    called when an episode arrives, before its checks, so the plan's first steps find them
    awake (after idle time they sleep, and waking one took as long as the tiny model's stem
    conv). Threads: :func:`get_num_threads`, which it returns (the episode's count)."""
    n = get_num_threads()
    _ext().wake_workers(n, WAKE_HOLD_US)  # n is in range: nothing for _call to translate
    return n


#: instruction-set paths of the kernels, slowest first (the ``QGNN_CPU_ISA`` values besides
#: ``auto``); dispatch takes the fastest one this process can run (:func:`isa_blocker` says
#: why a path cannot).
ISAS = ("scalar", "avx2", "avxvnni", "avx512vnni", "amx")


def force_isa(name: Optional[str]) -> None:
    """Force one of :data:`ISAS`; ``None`` / ``"auto"`` goes back to ``QGNN_CPU_ISA`` / detected.

    Raises KernelArgumentError for an unknown name and BackendUnavailableError for a path
    this CPU cannot run (both name the valid ones and what this CPU has).
    """
    _call(_ext().force_isa, name or "auto")


CONV_ALGOS = ("auto", "direct", "winograd")


def force_conv_algo(name: Optional[str]) -> None:
    """How 3x3 convs run on the AVX-512 VNNI path, process-wide: ``"auto"`` (or ``None``)
    picks integer Winograd F(2x2, 3x3) where it is exact and faster, ``"direct"`` never uses
    it, ``"winograd"`` uses it on every conv it is exact for (3x3, stride 1, pad 1, even
    output sizes, <= 4-bit codes, channels a multiple of 4). Results are identical either
    way. Raises KernelArgumentError for another name."""
    _call(_ext().force_conv_algo, name or "auto")


def conv_algo() -> str:
    """The setting of :func:`force_conv_algo`."""
    return _ext().conv_algo()


def winograd_runs() -> int:
    """How many convs this process has run as Winograd (a counter: tests and benches check
    which path ran)."""
    return _ext().winograd_runs()


def fused_redos() -> int:
    """How many rows x 16 columns of fused epilogues this process has redone in the
    reference's order, their quotient being within its error bound of a rounding boundary
    (a counter: tests check that the fallback runs)."""
    return _ext().fused_redos()


def active_isa() -> str:
    """The ISA path the next op runs on: forced, else ``QGNN_CPU_ISA`` (read once per
    process), else :func:`detected_isa`. A bad ``QGNN_CPU_ISA`` raises here and in every op
    (KernelArgumentError: unknown name; BackendUnavailableError: not runnable here)."""
    return _call(_ext().active_isa)


def detected_isa() -> str:
    """The fastest ISA path this CPU, OS and build can run."""
    return _ext().detected_isa()


def isa_blocker(name: str) -> str:
    """``""`` when this process can run ISA path ``name``, else why not (missing CPU
    features, OS state, or no kernels in this build)."""
    return _call(_ext().isa_blocker, name)


def available_isas() -> list:
    """The ISA paths this CPU can run (each can be forced with ``QGNN_CPU_ISA``), slowest first.

    Not always a prefix of :data:`ISAS`: e.g. a Cascade Lake has AVX-512 VNNI but no AVX-VNNI.
    """
    return [n for n in ISAS if not isa_blocker(n)]


def amx_probe() -> dict:
    """This CPU's AMX detection: CPUID leaf 7 EDX (bits 24/25 AMX-TILE/INT8), OSXSAVE, XCR0
    (bits 17/18 tile state), leaf 0x1D palette 1 geometry, the ``arch_prctl`` tile-data
    permission (``perm_errno``: 0 granted, -1 not asked) and ``blocker`` ("" = usable)."""
    return _ext().amx_probe()


def _call(fn, *args, **kwargs):
    """Call into the extension, turning its argument errors into the package's error type."""
    try:
        return fn(*args, **kwargs)
    except _ext().InputValueError as e:  # the caller's values (NaN / Inf images), not ours
        raise InputError(str(e)) from None
    except _ext().KernelArgumentError as e:
        raise KernelArgumentError(str(e)) from None
    except _ext().IsaUnavailableError as e:
        raise BackendUnavailableError(str(e)) from None
    except TypeError as e:  # pybind11 overload mismatch: a wrong Python type
        raise KernelArgumentError(str(e).splitlines()[0]) from None


def _np(t, name: str):
    """Zero-copy numpy view of a CPU tensor (None passes through)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise KernelArgumentError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        raise KernelArgumentError(f"{name} must be a CPU tensor, got device {t.device}")
    if t.dtype not in (torch.uint8, torch.float32, torch.int32):
        raise KernelArgumentError(f"{name} has unsupported dtype {t.dtype}")
    return t.detach().contiguous().numpy()


def _opt_float(v, name: str) -> Optional[float]:
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise KernelArgumentError(f"{name} must be a number, got {v!r}") from None


def _int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            if isinstance(v, torch.Tensor) or float(v) != int(v):
                raise ValueError
            v = int(v)
        except (TypeError, ValueError):
            raise KernelArgumentError(f"{name} must be an int, got {v!r}") from None
    return int(v)


# ------------------------------------------------------------------ weight prepack

class _PackCache:
    """Repacked weights per weight storage.

    Keyed on (data_ptr, shape, strides, geometry) so that the new tensor objects a
    dispatcher may hand over for the same parameter still hit. An entry holds a weak
    reference to the tensor it was built from and dies with it (a later tensor reusing
    the freed address cannot hit a stale entry); while that tensor lives, any tensor at
    the same address is a view of the same storage and shares its ``_version`` counter,
    which invalidates the entry on in-place edits.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._d = {}

    def get(self, w: Tensor, bits: int, k: int, taps: int):
        key = (w.data_ptr(), tuple(w.shape), tuple(w.stride()), bits, k, taps)
        ver = w._version
        with self._lock:
            hit = self._d.get(key)
            if hit is not None and hit[0]() is not None and hit[1] == ver:
                return hit[2]
        pw = cpu_prepack(w, bits, k, taps)
        with self._lock:
            ref = weakref.ref(w, lambda r, key=key: self._drop(key, r))
            self._d[key] = (ref, ver, pw)
        return pw

    def _drop(self, key, ref):
        with self._lock:
            if self._d.get(key, (None,))[0] is ref:
                del self._d[key]

    def clear(self):
        with self._lock:
            self._d.clear()


_cache = _PackCache()


def cpu_prepack(w_packed: Tensor, w_bits: int, k: int, taps: int = 1):
    """Repack canonical packed weights for the kernels (``_C.PackedWeights``).

    ``k`` is the reduction length (``kh*kw*C_in`` for a conv), ``taps`` = ``kh*kw``.
    """
    return _call(_ext().PackedWeights, _np(w_packed, "w_packed"), _int(w_bits, "w_bits"),
                 _int(k, "k"), _int(taps, "taps"))


def _weights(w_packed, w_bits: int, k: int, taps: int):
    ext = _ext()
    if isinstance(w_packed, ext.PackedWeights):
        if w_packed.bits != w_bits or w_packed.k != k or w_packed.taps != taps:
            raise KernelArgumentError(
                f"prepacked weights hold bits={w_packed.bits} K={w_packed.k} taps={w_packed.taps}, "
                f"the call needs bits={w_bits} K={k} taps={taps}")
        return w_packed
    if not isinstance(w_packed, torch.Tensor):
        raise KernelArgumentError(f"w_packed must be a tensor, got {type(w_packed).__name__}")
    if w_packed.dtype != torch.uint8 or w_packed.dim() != 2:
        raise KernelArgumentError(
            f"w_packed must be a 2-D uint8 tensor, got {w_packed.dtype} {tuple(w_packed.shape)}")
    return _cache.get(w_packed, _int(w_bits, "w_bits"), k, taps)


def cpu_pack(codes: Tensor, bits: int) -> Tensor:
    """uint8 codes [O, K] -> canonical packed rows (same bytes as ``ops.packing.pack_codes``)."""
    return torch.from_numpy(_call(_ext().pack, _np(codes, "codes"), _int(bits, "bits")))


def cpu_unpack(packed: Tensor, bits: int, k: int) -> Tensor:
    """Canonical packed rows -> uint8 codes [O, K] (``ops.packing.unpack_codes``)."""
    return torch.from_numpy(_call(_ext().unpack, _np(packed, "packed"), _int(bits, "bits"), _int(k, "k")))


# ------------------------------------------------------------------ ops

def cpu_quantize(x: Tensor, l: float, s: float, bits: int) -> Tensor:
    """fp32 ``x`` -> uint8 codes ``clamp(rne((x - l) / s), 0, 2^bits - 1)`` (as ``ref_quantize``).

    NaN/Inf inputs raise KernelArgumentError (the kernel itself maps NaN to 0, never UB).
    """
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise KernelArgumentError(f"quantize expects float32, got {getattr(x, 'dtype', type(x).__name__)}")
    out = _call(_ext().quantize, _np(x, "x"), _opt_float(l, "l"), _opt_float(s, "s"),
                _int(bits, "bits"), get_num_threads())
    return torch.from_numpy(out)


def _epi_args(w_scale, w_offset, a_scale, a_offset, post_scale, post_shift, residual, slope,
              out_l, out_s, out_bits):
    return dict(w_scale=_np(w_scale, "w_scale"), w_offset=_np(w_offset, "w_offset"),
                a_scale=_opt_float(a_scale, "a_scale"), a_offset=_opt_float(a_offset, "a_offset"),
                post_scale=_np(post_scale, "post_scale"), post_shift=_np(post_shift, "post_shift"),
                residual=_np(residual, "residual"), slope=_opt_float(slope, "slope"),
                out_l=_opt_float(out_l, "out_l"), out_s=_opt_float(out_s, "out_s"),
                out_bits=None if out_bits is None else _int(out_bits, "out_bits"))


def _need(v, name):
    if v is None:
        raise KernelArgumentError(f"{name} is required")
    return v


def cpu_qlinear(x: Tensor, w_packed, w_bits: int, a_bits: int, w_scale: Tensor,
                w_offset: Tensor, a_scale: float, a_offset: float,
                post_scale: Optional[Tensor] = None, post_shift: Optional[Tensor] = None,
                residual: Optional[Tensor] = None, slope: Optional[float] = None,
                out_l: Optional[float] = None, out_s: Optional[float] = None,
                out_bits: Optional[int] = None) -> Tensor:
    """Quantized linear / 1x1 conv over rows; arguments and result as ``ref_qlinear``."""
    xa = _np(x, "x")
    if xa.ndim != 2:
        raise KernelArgumentError(f"x must be 2-D, got shape {tuple(x.shape)}")
    pw = _weights(w_packed, w_bits, int(xa.shape[1]), 1)
    out = _call(_ext().qlinear, xa, pw, _int(a_bits, "a_bits"), nthreads=get_num_threads(),
                **_epi_args(_need(w_scale, "w_scale"), _need(w_offset, "w_offset"), a_scale, a_offset,
                            post_scale, post_shift, residual, slope, out_l, out_s, out_bits))
    return torch.from_numpy(out)


def _conv_k(x, kernel_size) -> Tuple[int, int]:
    ks = _int(kernel_size, "kernel_size")
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise KernelArgumentError(f"x must be a 4-D NHWC tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if ks < 1:
        raise KernelArgumentError(f"bad conv geometry kernel_size={ks}")
    return ks, ks * ks * int(x.shape[3])


def cpu_qconv2d(x: Tensor, w_packed, w_bits: int, a_bits: int, kernel_size: int, stride: int,
                padding: int, w_scale: Tensor, w_offset: Tensor, a_scale: float, a_offset: float,
                post_scale: Optional[Tensor] = None, post_shift: Optional[Tensor] = None,
                residual: Optional[Tensor] = None, slope: Optional[float] = None,
                out_l: Optional[float] = None, out_s: Optional[float] = None,
                out_bits: Optional[int] = None) -> Tensor:
    """Quantized conv2d, NHWC, implicit GEMM; arguments and result as ``ref_qconv2d``."""
    ks, k = _conv_k(x, kernel_size)
    xa = _np(x, "x")
    pw = _weights(w_packed, w_bits, k, ks * ks)
    out = _call(_ext().qconv2d, xa, pw, _int(a_bits, "a_bits"), ks, _int(stride, "stride"),
                _int(padding, "padding"), nthreads=get_num_threads(),
                **_epi_args(_need(w_scale, "w_scale"), _need(w_offset, "w_offset"), a_scale, a_offset,
                            post_scale, post_shift, residual, slope, out_l, out_s, out_bits))
    return torch.from_numpy(out)


def cpu_qbmm(a: Tensor, v: Tensor, a_bits: int, v_bits: int, a_scale: float, a_offset: float,
             v_scale: float, v_offset: float, row_bits: Optional[Tensor] = None,
             row_offset: Optional[Tensor] = None) -> Tensor:
    """Quantized graph aggregation ``A @ V`` per task; arguments and result as ``ref_qbmm``
    (per-node codes with row_bits / row_offset)."""
    out = _call(_ext().qbmm, _np(a, "a"), _np(v, "v"), _int(a_bits, "a_bits"), _int(v_bits, "v_bits"),
                _opt_float(a_scale, "a_scale"), _opt_float(a_offset, "a_offset"),
                _opt_float(v_scale, "v_scale"), _opt_float(v_offset, "v_offset"), get_num_threads(), False,
                None if row_bits is None else _np(row_bits, "row_bits"),
                None if row_offset is None else _np(row_offset, "row_offset"))
    return torch.from_numpy(out)


def cpu_node_rows(v: Tensor, node_bits) -> Tuple[Tensor, Tensor, Tensor]:
    """Per-node widths of node codes; arguments and result as ``ref_node_rows``."""
    bits = [_int(b, "node_bits") for b in node_bits]
    q, rb, ro = _call(_ext().node_rows, _np(v, "v"), bits)
    return torch.from_numpy(q), torch.from_numpy(rb), torch.from_numpy(ro)


# ------------------------------------------------------------------ raw integer parts (tests)

def _unit_epi(o: int):
    return dict(w_scale=torch.ones(o).numpy(), w_offset=torch.zeros(o).numpy(), a_scale=1.0, a_offset=0.0)


def cpu_linear_acc(x: Tensor, w_packed, w_bits: int, a_bits: int = 8) -> Tuple[Tensor, Tensor]:
    """Integer parts of a linear layer from the kernel: ACC int32 [M, O], AS int32 [M]."""
    xa = _np(x, "x")
    if xa.ndim != 2:
        raise KernelArgumentError(f"x must be 2-D, got shape {tuple(x.shape)}")
    pw = _weights(w_packed, w_bits, int(xa.shape[1]), 1)
    _, acc, as_ = _call(_ext().qlinear, xa, pw, _int(a_bits, "a_bits"), nthreads=get_num_threads(),
                        want_acc=True, **_unit_epi(pw.out_features))
    return torch.from_numpy(acc), torch.from_numpy(as_)


def cpu_conv2d_acc(x: Tensor, w_packed, w_bits: int, kernel_size: int, stride: int, padding: int,
                   a_bits: int = 8) -> Tuple[Tensor, Tensor]:
    """Integer parts of a conv from the kernel: ACC int32 [B, Ho, Wo, O], AS int32 [B, Ho, Wo]."""
    ks, k = _conv_k(x, kernel_size)
    pw = _weights(w_packed, w_bits, k, ks * ks)
    out, acc, as_ = _call(_ext().qconv2d, _np(x, "x"), pw, _int(a_bits, "a_bits"), ks, _int(stride, "stride"),
                          _int(padding, "padding"), nthreads=get_num_threads(), want_acc=True,
                          **_unit_epi(pw.out_features))
    b, ho, wo, o = out.shape
    return torch.from_numpy(acc).view(b, ho, wo, o), torch.from_numpy(as_).view(b, ho, wo)


def cpu_bmm_acc(a: Tensor, v: Tensor, a_bits: int = 8, v_bits: int = 8) -> Tuple[Tensor, Tensor, Tensor]:
    """Integer parts of the aggregation from the kernel: ACC [T, N, D], AS [T, N], VS [T, D]."""
    _, acc, as_, vs = _call(_ext().qbmm, _np(a, "a"), _np(v, "v"), _int(a_bits, "a_bits"),
                            _int(v_bits, "v_bits"), 1.0, 0.0, 1.0, 0.0, get_num_threads(), True)
    return torch.from_numpy(acc), torch.from_numpy(as_), torch.from_numpy(vs)


__all__ = [
    "cpu_quantize", "cpu_qlinear", "cpu_qconv2d", "cpu_qbmm", "cpu_node_rows", "cpu_pack", "cpu_unpack",
    "cpu_prepack", "cpu_linear_acc", "cpu_conv2d_acc", "cpu_bmm_acc", "set_num_threads",
    "get_num_threads", "force_isa", "active_isa", "detected_isa", "isa_blocker", "available_isas",
    "amx_probe", "ISAS", "force_conv_algo", "conv_algo", "winograd_runs", "fused_redos", "CONV_ALGOS",
    "is_available",
]
