"""Pauta quantization (PQ): the quantizer of QGNN-IC."""
from .pauta import PautaQuantizer, pauta_codes, pauta_fake_quant, pauta_init_range, pauta_step

__all__ = ["PautaQuantizer", "pauta_codes", "pauta_fake_quant", "pauta_init_range", "pauta_step"]
