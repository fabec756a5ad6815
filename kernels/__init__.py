"""Triton packed-int kernels of qgnn-deploy (installed as ``qgnn_deploy.kernels``).

One file per kernel family:

- ``qgemm``    packed 2/3/4/8-bit GEMM (linear, 1x1 conv over rows), ``tl.dot`` int8 -> int32
- ``qconv``    implicit-GEMM conv2d, NHWC, any square kernel / stride / zero padding
- ``qgemv``    the small-M path (``tl.sum``, split-K) for M <= 8
- ``qbmm``     batched graph aggregation ``A @ V``, several tasks per program; per-node widths
- ``quantize`` fp32 -> codes
- ``_common``  weight-tile unpacking, exact rounding, the int32 corrections and the fused
               (centred) fp32 epilogue
- ``layout``   load-time repacking of canonical packed weights (bit-layout diagrams there)
- ``autotune`` explicit configs keyed on shapes, pruned for shared memory

Importing this package imports triton (the backend module imports it lazily). Whether
the kernels run compiled (CUDA) or interpreted (numpy on CPU) is fixed when this package
is first imported: set ``TRITON_INTERPRET=1`` before that to run them on CPU tensors.
The Python launchers with the reference-op signatures live in
``qgnn_deploy.backends.triton``.
"""
from ._common import MAX_REDUCTION
from .autotune import INTERPRETED, STDLIB_INTERPRETED, interpreter_meta, interpreter_rows, tuned
from .layout import K_ALIGN, TritonWeight, repack
from .qbmm import node_rows_kernel, qbmm_kernel
from .qconv import qconv_kernel
from .qgemm import qgemm_kernel
from .qgemv import qgemv_finish_kernel, qgemv_kernel
from .quantize import quantize_kernel

__all__ = ["INTERPRETED", "STDLIB_INTERPRETED", "K_ALIGN", "MAX_REDUCTION", "TritonWeight",
           "interpreter_meta", "interpreter_rows", "node_rows_kernel", "qbmm_kernel", "qconv_kernel", "qgemm_kernel", "qgemv_finish_kernel", "qgemv_kernel",
           "quantize_kernel", "repack", "tuned"]
