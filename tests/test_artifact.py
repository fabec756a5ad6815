"""The .qgnn artifact: exact round trip, size budget, and every corruption raising ArtifactError."""
import hashlib
import json
import struct

import pytest
import torch
from safetensors.torch import load as st_load, save as st_save

from qgnn_deploy.artifact import (HEADER_HASH_KEY, HEADER_KEY, expected_artifact_bytes, load_int_model,
                                  read_header, save_int_model)
from qgnn_deploy.errors import ArtifactError
from qgnn_deploy.fold import fold
from test_fold import calibrated, episodes


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    im = fold(calibrated("tiny", 3, weight_granularity="channel"), backend="reference")
    path = str(tmp_path_factory.mktemp("a") / "m.qgnn")
    save_int_model(im, path)
    return im, path


def _rewrite(path, out, header_edit=None, tensors_edit=None, fix_hash=True):
    data = open(path, "rb").read()
    n = struct.unpack("<Q", data[:8])[0]
    meta = json.loads(data[8:8 + n])["__metadata__"]
    tensors = st_load(data)
    header = json.loads(meta[HEADER_KEY])
    if header_edit:
        header_edit(header)
    if tensors_edit:
        tensors_edit(tensors)
    text = json.dumps(header, separators=(",", ":"), sort_keys=True)
    meta = {HEADER_KEY: text, HEADER_HASH_KEY: hashlib.sha256(text.encode()).hexdigest() if fix_hash else meta[HEADER_HASH_KEY]}
    open(out, "wb").write(st_save(tensors, metadata=meta))
    return out


def test_round_trip_is_exact(saved):
    im, path = saved
    im2 = load_int_model(path, backend="reference")
    images, labels = episodes(im.config, 2, 3)
    assert torch.equal(im(images, labels).logits, im2(images, labels).logits)
    assert [n for n, _ in im.named_layers()] == [n for n, _ in im2.named_layers()]
    h = read_header(path)
    assert h["format_version"] == 1 and h["packing"] == "lsb-stream-k8" and h["zero_point"] == "exact"


def test_size_within_budget_resnet12(tmp_path):
    im = fold(calibrated("resnet12-cifarfs", 4))
    size = save_int_model(im, str(tmp_path / "r.qgnn"))
    budget = expected_artifact_bytes(im)["total"]
    assert abs(size - budget) <= 0.10 * budget, (size, budget)


def test_truncated(saved, tmp_path):
    _, path = saved
    data = open(path, "rb").read()
    for cut in (4, 100, len(data) // 2, len(data) - 1):
        p = tmp_path / f"t{cut}.qgnn"
        p.write_bytes(data[:cut])
        with pytest.raises(ArtifactError, match="truncated|corrupt"):
            load_int_model(str(p))


def test_lying_header_length(saved, tmp_path):
    data = open(saved[1], "rb").read()
    p = tmp_path / "lie.qgnn"
    p.write_bytes(struct.pack("<Q", 2 ** 62) + data[8:])
    with pytest.raises(ArtifactError, match="claims"):
        load_int_model(str(p))


def test_bit_flips_in_header_and_data(saved, tmp_path):
    data = bytearray(open(saved[1], "rb").read())
    n = struct.unpack("<Q", bytes(data[:8]))[0]
    text = bytes(data[8:8 + n])
    pos = text.index(b'a_scale') + 12  # a digit of a number inside our (escaped) header JSON
    for where in (8 + pos, len(data) - 5):
        flipped = bytearray(data)
        flipped[where] ^= 0x04
        p = tmp_path / f"f{where}.qgnn"
        p.write_bytes(bytes(flipped))
        with pytest.raises(ArtifactError, match="checksum|corrupt"):
            load_int_model(str(p))


def test_wrong_version(saved, tmp_path):
    p = _rewrite(saved[1], str(tmp_path / "v.qgnn"), header_edit=lambda h: h.update(format_version=2))
    with pytest.raises(ArtifactError, match="format version 2"):
        load_int_model(p)


def test_missing_and_extra_tensors(saved, tmp_path):
    name = "backbone.layer1.0.conv2.w_packed"
    p = _rewrite(saved[1], str(tmp_path / "m.qgnn"), tensors_edit=lambda t: t.pop(name))
    with pytest.raises(ArtifactError, match="missing"):
        load_int_model(p)
    p = _rewrite(saved[1], str(tmp_path / "e.qgnn"), tensors_edit=lambda t: t.update(extra=torch.zeros(3)))
    with pytest.raises(ArtifactError, match="unexpected"):
        load_int_model(p)


def test_shape_lie_and_bad_bits(saved, tmp_path):
    def shrink(t):
        t["backbone.layer1.0.conv2.w_packed"] = t["backbone.layer1.0.conv2.w_packed"][:, :-1].contiguous()
    p = _rewrite(saved[1], str(tmp_path / "s.qgnn"), tensors_edit=shrink)
    with pytest.raises(ArtifactError, match="differs from the header|expected"):
        load_int_model(p)

    def bits5(h):
        h["layers"][1]["a_bits"] = 5
    p = _rewrite(saved[1], str(tmp_path / "b.qgnn"), header_edit=bits5)
    with pytest.raises(ArtifactError, match="a_bits=5"):
        load_int_model(p)


def test_not_an_artifact(tmp_path):
    p = tmp_path / "x.qgnn"
    p.write_bytes(st_save({"a": torch.zeros(2)}))
    with pytest.raises(ArtifactError, match="not a qgnn-deploy integer model"):
        load_int_model(str(p))
    with pytest.raises(ArtifactError, match="does not exist"):
        load_int_model(str(tmp_path / "nope.qgnn"))
