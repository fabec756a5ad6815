"""Canonical packing (ops/packing.py) and the qgnn::pack / qgnn::unpack ops."""
import pytest
import torch

from qgnn_deploy.backends import use_backend
from qgnn_deploy.errors import KernelArgumentError
from qgnn_deploy.ops import registry
from qgnn_deploy.ops.packing import PACKABLE_BITS, pack_codes, packed_row_bytes, unpack_codes


@pytest.mark.parametrize("bits", PACKABLE_BITS)
@pytest.mark.parametrize("k", [1, 3, 7, 8, 9, 13, 16, 63, 100])
def test_round_trip_every_width_and_ragged_k(bits, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 2 ** bits, (5, k), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, packed_row_bytes(k, bits))
    assert torch.equal(unpack_codes(packed, bits, k), codes)


@pytest.mark.parametrize("bits", PACKABLE_BITS)
def test_extreme_codes_round_trip(bits):
    top = 2 ** bits - 1
    codes = torch.tensor([[top] * 11, [0] * 11, [top, 0] * 5 + [top]], dtype=torch.uint8)
    assert torch.equal(unpack_codes(pack_codes(codes, bits), bits, 11), codes)


def test_layout_is_lsb_first_bit_stream():
    # 4-bit: c0 in the low nibble; 2-bit: c0 in bits 1..0
    assert pack_codes(torch.tensor([[0x1, 0xA]], dtype=torch.uint8), 4).tolist() == [[0xA1, 0, 0, 0]]
    assert pack_codes(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2)[0, 0].item() == 0b00111001
    # 3-bit: 8 codes in 3 bytes, c0 = bits 2..0, c2 straddles bytes 0 and 1
    codes = torch.tensor([[1, 2, 7, 0, 0, 0, 0, 5]], dtype=torch.uint8)
    stream = sum(int(c) << (3 * i) for i, c in enumerate(codes[0]))
    assert pack_codes(codes, 3)[0].tolist() == [stream & 0xFF, (stream >> 8) & 0xFF, stream >> 16]
    # rows pad to 8 codes with zero codes: K=9 at 2 bits is 4 bytes, code 8 alone in byte 2
    assert pack_codes(torch.full((1, 9), 3, dtype=torch.uint8), 2)[0].tolist() == [255, 255, 3, 0]


def test_pack_ops_dispatch_to_reference():
    codes = torch.randint(0, 8, (4, 21), dtype=torch.uint8)
    with use_backend("reference"):
        packed = registry.pack(codes, 3)
        assert torch.equal(packed, pack_codes(codes, 3))
        assert torch.equal(registry.unpack(packed, 3, 21), codes)


@pytest.mark.parametrize("bits", [0, 1, 5, 6, 7, 16, 32])
def test_unsupported_bits_raise(bits):
    with pytest.raises(KernelArgumentError, match="bits"):
        pack_codes(torch.zeros(2, 8, dtype=torch.uint8), bits)
    with pytest.raises(KernelArgumentError, match="bits"):
        unpack_codes(torch.zeros(2, 8, dtype=torch.uint8), bits, 8)


def test_bad_inputs_raise():
    with pytest.raises(KernelArgumentError, match="exceed"):
        pack_codes(torch.full((1, 4), 4, dtype=torch.uint8), 2)
    with pytest.raises(KernelArgumentError, match="uint8"):
        pack_codes(torch.zeros(1, 4, dtype=torch.int32), 2)
    with pytest.raises(KernelArgumentError, match="K=9"):
        unpack_codes(torch.zeros(1, 2, dtype=torch.uint8), 2, 9)
