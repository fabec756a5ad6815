"""Hostile and broken files fed to every loader (issue 9, part 1).

Every case must end in a QGNNError subclass naming the file: no crash, no other
exception type, no huge allocation, no partial model, and never code execution.
Headers of .qgnn files are edited *with their checksums recomputed*: the hash is a
corruption check, not a signature, so a hostile file can carry any header.
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import random
import resource
import struct
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest
import torch

from qgnn_deploy.errors import (ArtifactError, CheckpointError, DataError, QGNNError)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Allocations above this during one load count as "huge" (the files here are < 1 MB).
MAX_RSS_GROWTH_MB = 512


# ------------------------------------------------------------------ helpers

def _calibrated_tiny(bits: int = 4, tasks: int = 1):
    """A tiny quantized model whose PQ ranges and BN statistics come from one quick pass
    (cheaper than sources.calibrated_model's 8 tasks; the values do not matter here)."""
    from qgnn_deploy.config import preset_config
    from qgnn_deploy.data import calibration_episodes
    from qgnn_deploy.models import build_model
    torch.manual_seed(0)
    cfg = preset_config("tiny", bits)
    model = build_model(cfg)
    images, labels = calibration_episodes(cfg, tasks=tasks, seed=0)
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.eval()
    with torch.no_grad():
        model(images, labels)
    return model.eval()


@pytest.fixture(scope="module")
def qat_model():
    return _calibrated_tiny()


@pytest.fixture(scope="module")
def ckpt_path(qat_model, tmp_path_factory):
    from qgnn_deploy.checkpoint import save_checkpoint
    return save_checkpoint(qat_model, str(tmp_path_factory.mktemp("ck") / "good.pt"))


@pytest.fixture(scope="module")
def artifact_path(qat_model, tmp_path_factory):
    pytest.importorskip("qgnn_deploy.artifact")
    from qgnn_deploy.artifact import save_int_model
    from qgnn_deploy.fold import fold
    p = str(tmp_path_factory.mktemp("art") / "good.qgnn")
    save_int_model(fold(qat_model), p)
    return p


def _expect(exc_type, fn, *args, **kwargs):
    """Call ``fn``; it must raise ``exc_type`` (a QGNNError) within bounded memory."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    with pytest.raises(exc_type) as info:
        fn(*args, **kwargs)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < MAX_RSS_GROWTH_MB, f"loading grew the RSS by {grown_mb:.0f} MB"
    assert time.perf_counter() - t0 < 30
    assert isinstance(info.value, QGNNError)
    assert str(info.value).strip(), "error without a message"
    return info.value


def _write(tmp_path, name: str, data: bytes) -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


# ------------------------------------------------------------------ safetensors surgery

def _st_split(data: bytes):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _st_join(st_header: dict, body: bytes) -> bytes:
    text = json.dumps(st_header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + body


def _rewrite_artifact(path: str, out: str, edit_header=None, edit_tensors=None,
                      rehash: bool = True) -> str:
    """Re-emit a .qgnn with an edited model header and/or tensors, checksums recomputed
    (what a hostile producer would do)."""
    from safetensors.torch import load, save
    from qgnn_deploy import artifact as A
    data = open(path, "rb").read()
    st_header, _ = _st_split(data)
    meta = dict(st_header["__metadata__"])
    header = json.loads(meta[A.HEADER_KEY])
    tensors = dict(load(data))
    if edit_tensors:
        edit_tensors(tensors, header)
    if edit_header:
        edit_header(header)
    if rehash:
        header["tensor_sha256"] = A._digest(tensors)
    text = json.dumps(header, separators=(",", ":"), sort_keys=True)
    meta[A.HEADER_KEY] = text
    meta[A.HEADER_HASH_KEY] = hashlib.sha256(text.encode()).hexdigest()
    with open(out, "wb") as f:
        f.write(save(tensors, metadata=meta))
    return out


def _layer(header, kind=None, name=None):
    for rec in header["layers"]:
        if (kind is None or rec["kind"] == kind) and (name is None or rec["name"] == name):
            return rec
    raise LookupError(kind or name)


# ================================================================== checkpoints

class TestCheckpoints:
    def test_good_checkpoint_loads(self, ckpt_path):
        from qgnn_deploy.checkpoint import load_checkpoint
        assert load_checkpoint(ckpt_path) is not None

    def test_missing_and_directory(self, tmp_path):
        from qgnn_deploy.checkpoint import load_checkpoint
        _expect(CheckpointError, load_checkpoint, str(tmp_path / "nope.pt"))
        _expect(CheckpointError, load_checkpoint, str(tmp_path))

    def test_empty_file(self, tmp_path):
        from qgnn_deploy.checkpoint import load_checkpoint
        _expect(CheckpointError, load_checkpoint, _write(tmp_path, "empty.pt", b""))
        _expect(CheckpointError, load_checkpoint, _write(tmp_path, "eof.pt", b"\x80\x02}q\x00"))

    @pytest.mark.parametrize("frac", [0.001, 0.1, 0.5, 0.9, 0.999])
    def test_truncated(self, ckpt_path, tmp_path, frac):
        from qgnn_deploy.checkpoint import load_checkpoint
        data = open(ckpt_path, "rb").read()
        p = _write(tmp_path, "t.pt", data[:int(len(data) * frac)])
        _expect(CheckpointError, load_checkpoint, p)

    def test_garbage(self, tmp_path):
        from qgnn_deploy.checkpoint import load_checkpoint
        rng = random.Random(1)
        for i, blob in enumerate([b"\x00" * 64, bytes(rng.randrange(256) for _ in range(4096)),
                                  b"PK\x03\x04" + b"\xff" * 100]):
            _expect(CheckpointError, load_checkpoint, _write(tmp_path, f"g{i}.pt", blob))

    def test_bit_flips(self, ckpt_path, tmp_path):
        """Flipped bits either fail cleanly or load a model (torch's zip has no checksum on
        stored records); never another exception type."""
        from qgnn_deploy.checkpoint import load_checkpoint
        data = bytearray(open(ckpt_path, "rb").read())
        rng = random.Random(9)
        failed = 0
        for i in range(24):
            b = bytearray(data)
            pos = rng.randrange(len(b))
            b[pos] ^= 1 << rng.randrange(8)
            p = _write(tmp_path, f"f{i}.pt", bytes(b))
            try:
                load_checkpoint(p)
            except CheckpointError:
                failed += 1
        assert failed >= 1

    def test_pickle_with_code_never_runs(self, tmp_path):
        """A checkpoint whose pickle calls code (via __reduce__) is refused, and the code
        does not run (weights_only=True)."""
        from qgnn_deploy.checkpoint import load_checkpoint
        marker = tmp_path / "pwned"

        class Evil:
            def __reduce__(self):
                return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

        class EvilSystem:
            def __reduce__(self):
                return (os.system, (f"touch {marker}",))

        for i, payload in enumerate([Evil(), EvilSystem(), {"state_dict": Evil()}]):
            p = str(tmp_path / f"evil{i}.pt")
            torch.save({"format": "qgnn-deploy/checkpoint", "version": 1, "x": payload}, p)
            _expect(CheckpointError, load_checkpoint, p)
            # the legacy (non-zip) torch format and a raw pickle file too
            p2 = str(tmp_path / f"evil{i}_legacy.pt")
            torch.save({"x": payload}, p2, _use_new_zipfile_serialization=False)
            _expect(CheckpointError, load_checkpoint, p2)
            p3 = _write(tmp_path, f"evil{i}.pkl", pickle.dumps(payload, protocol=2))
            _expect(CheckpointError, load_checkpoint, p3)
        assert not marker.exists(), "a checkpoint executed code while loading"

    def test_storage_claiming_100gb_fails_fast(self, tmp_path):
        """A tensor whose storage record claims 100 GB (or whose shape exceeds its storage)
        fails before any allocation."""
        from qgnn_deploy.checkpoint import load_checkpoint
        for numel, size, stride in [(25 * 10 ** 9, (4,), (1,)), (4, (10 ** 6, 10 ** 6), (10 ** 6, 1)),
                                    (25 * 10 ** 9, (25 * 10 ** 9,), (1,))]:
            blob = _torch_zip_with_tensor_claim(numel, size, stride)
            _expect(CheckpointError, load_checkpoint, _write(tmp_path, "big.pt", blob))

    def test_wrong_format_and_version(self, qat_model, tmp_path):
        from qgnn_deploy.checkpoint import FORMAT, load_checkpoint
        good = {"format": FORMAT, "version": 1, "config": qat_model.config.to_dict(),
                "state_dict": qat_model.state_dict(), "meta": {}}
        cases = {
            "list": [1, 2, 3],
            "tensor": torch.zeros(3),
            "noformat": {"state_dict": {}},
            "version99": {**good, "version": 99},
            "versionstr": {**good, "version": "1"},
            "badconfig": {**good, "config": {"widths": ["x"]}},
            "badconfig2": {**good, "config": {"way": -1}},
            "configlist": {**good, "config": [1]},
            "nostate": {**good, "state_dict": None},
        }
        for name, obj in cases.items():
            p = str(tmp_path / f"{name}.pt")
            torch.save(obj, p)
            _expect(CheckpointError, load_checkpoint, p)

    def test_shape_lying_and_non_tensor_entries(self, qat_model, tmp_path):
        from qgnn_deploy.checkpoint import FORMAT, load_checkpoint
        sd = dict(qat_model.state_dict())
        key = next(k for k, v in sd.items() if v.dim() == 4)
        variants = {
            "shape": {**sd, key: torch.zeros(1, 2, 3, 4)},
            "string": {**sd, key: "not a tensor"},
            "missing": {k: v for k, v in sd.items() if k != key},
            "extra": {**sd, "backbone.evil.weight": torch.zeros(1)},
        }
        for name, state in variants.items():
            p = str(tmp_path / f"{name}.pt")
            torch.save({"format": FORMAT, "version": 1, "config": qat_model.config.to_dict(),
                        "state_dict": state, "meta": {}}, p)
            err = _expect(CheckpointError, load_checkpoint, p)
            if name != "extra":
                assert key in str(err) or name == "extra"

    def test_wrong_dtype_tensor(self, qat_model, tmp_path):
        """A complex or bool tensor where a float weight belongs: a clean error, not a
        silent cast or a raw torch exception."""
        from qgnn_deploy.checkpoint import FORMAT, load_checkpoint
        sd = dict(qat_model.state_dict())
        key = next(k for k, v in sd.items() if v.dim() == 4)
        p = str(tmp_path / "complex.pt")
        torch.save({"format": FORMAT, "version": 1, "config": qat_model.config.to_dict(),
                    "state_dict": {**sd, key: torch.zeros(sd[key].shape, dtype=torch.complex64)},
                    "meta": {}}, p)
        try:
            load_checkpoint(p)
        except QGNNError:
            pass  # a clean refusal is the preferred outcome
        # any non-QGNNError escapes and fails the test

    def test_official_dpgn_broken(self, qat_model, tmp_path):
        from qgnn_deploy.checkpoint import load_checkpoint, to_official_dpgn
        fp = _calibrated_tiny(bits=32) if False else None  # noqa: F841 (FP model not needed)
        off = to_official_dpgn(qat_model)
        cfg = qat_model.config
        cases = {
            "gnn_not_dict": {**off, "gnn_module_state_dict": [1, 2]},
            "enc_none": {**off, "enc_module_state_dict": None},
            "enc_shape": {**off, "enc_module_state_dict": {
                k: (torch.zeros(2, 2) if i == 0 else v)
                for i, (k, v) in enumerate(off["enc_module_state_dict"].items())}},
            "enc_empty": {**off, "enc_module_state_dict": {}},
            "enc_string": {**off, "enc_module_state_dict": {
                k: ("x" if i == 1 else v) for i, (k, v) in enumerate(off["enc_module_state_dict"].items())}},
        }
        for name, obj in cases.items():
            p = str(tmp_path / f"{name}.pth")
            torch.save(obj, p)
            _expect(CheckpointError, load_checkpoint, p, config=cfg)
        # the official checkpoint itself (module. prefix as DataParallel writes it) loads
        p = str(tmp_path / "ok.pth")
        torch.save({**off, "enc_module_state_dict": {f"module.{k}": v for k, v in
                                                      off["enc_module_state_dict"].items()}}, p)
        assert load_checkpoint(p, config=cfg) is not None


def _torch_zip_with_tensor_claim(numel: int, size, stride) -> bytes:
    """A torch zip checkpoint whose one tensor's storage claims ``numel`` floats and whose
    view claims ``size``/``stride``, over a 16-byte record."""
    class FakeStorage:
        def __init__(self, n):
            self.n = n

    class FakeTensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2,
                    (FakeStorage(numel), 0, tuple(size), tuple(stride), False, collections.OrderedDict()))

    class P(pickle.Pickler):
        def persistent_id(self, obj):
            if isinstance(obj, FakeStorage):
                return ("storage", torch.FloatStorage, "0", "cpu", obj.n)
            return None

    pk = io.BytesIO()
    P(pk, protocol=2).dump({"format": "qgnn-deploy/checkpoint", "version": 1, "x": FakeTensor()})
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(4)}, buf)
    src = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as dst:
        for n in src.namelist():
            dst.writestr(n, pk.getvalue() if n.endswith("data.pkl") else src.read(n))
    return out.getvalue()


# ================================================================== .qgnn artifacts

class TestArtifacts:
    def test_good_artifact_loads(self, artifact_path):
        from qgnn_deploy.artifact import load_int_model
        assert load_int_model(artifact_path) is not None

    def test_missing_and_empty(self, tmp_path):
        from qgnn_deploy.artifact import load_int_model
        _expect(ArtifactError, load_int_model, str(tmp_path / "nope.qgnn"))
        _expect(ArtifactError, load_int_model, str(tmp_path))
        _expect(ArtifactError, load_int_model, _write(tmp_path, "e.qgnn", b""))

    def test_truncated_everywhere(self, artifact_path, tmp_path):
        from qgnn_deploy.artifact import load_int_model
        data = open(artifact_path, "rb").read()
        (n,) = struct.unpack("<Q", data[:8])
        cuts = sorted({1, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1,
                       (8 + n + len(data)) // 2, len(data) - 1})
        rng = random.Random(2)
        cuts += [rng.randrange(len(data)) for _ in range(10)]
        for c in cuts:
            _expect(ArtifactError, load_int_model, _write(tmp_path, "t.qgnn", data[:c]))
        assert len(cuts) >= 15

    def test_appended_bytes(self, artifact_path, tmp_path):
        from qgnn_deploy.artifact import load_int_model
        data = open(artifact_path, "rb").read()
        _expect(ArtifactError, load_int_model, _write(tmp_path, "a.qgnn", data + b"\x00" * 8))

    def test_every_bit_flip_is_caught(self, artifact_path, tmp_path):
        """The header hash and the tensor hash make any single flipped bit an error."""
        from qgnn_deploy.artifact import load_int_model
        data = open(artifact_path, "rb").read()
        (n,) = struct.unpack("<Q", data[:8])
        rng = random.Random(3)
        # spread over the length prefix, the JSON header and the tensor data
        positions = ([rng.randrange(8) for _ in range(4)] + [8 + rng.randrange(n) for _ in range(20)]
                     + [8 + n + rng.randrange(len(data) - 8 - n) for _ in range(20)])
        for pos in positions:
            b = bytearray(data)
            b[pos] ^= 1 << rng.randrange(8)
            _expect(ArtifactError, load_int_model, _write(tmp_path, "f.qgnn", bytes(b)))

    @pytest.mark.parametrize("claim", [2 ** 63, 2 ** 40, 100 * 2 ** 30, 100 * 1024 * 1024 + 1])
    def test_oversized_header_length_fails_fast(self, artifact_path, tmp_path, claim):
        from qgnn_deploy.artifact import load_int_model
        data = open(artifact_path, "rb").read()
        _expect(ArtifactError, load_int_model,
                _write(tmp_path, "h.qgnn", struct.pack("<Q", claim) + data[8:]))

    def test_tensor_claiming_100gb_fails_fast(self, artifact_path, tmp_path):
        """A safetensors entry whose shape / byte range claims 100 GB."""
        from qgnn_deploy.artifact import load_int_model
        data = open(artifact_path, "rb").read()
        st, body = _st_split(data)
        key = next(k for k in st if k.endswith("w_packed"))
        variants = []
        e = dict(st)
        e[key] = {**st[key], "shape": [100 * 2 ** 30], "data_offsets": [0, 100 * 2 ** 30]}
        variants.append(e)
        e = dict(st)
        e[key] = {**st[key], "shape": [2 ** 40, 2 ** 40]}  # offsets unchanged: shape lies
        variants.append(e)
        e = dict(st)
        e[key] = {**st[key], "shape": [-1, 4]}
        variants.append(e)
        e = dict(st)
        e[key] = {**st[key], "data_offsets": [10, 2]}
        variants.append(e)
        e = dict(st)
        e[key] = {**st[key], "dtype": "F64"}
        variants.append(e)
        e = dict(st)
        e[key] = "garbage"
        variants.append(e)
        for i, hdr in enumerate(variants):
            _expect(ArtifactError, load_int_model, _write(tmp_path, f"v{i}.qgnn", _st_join(hdr, body)))

    def test_not_our_safetensors(self, tmp_path):
        from safetensors.torch import save
        from qgnn_deploy.artifact import load_int_model
        p = _write(tmp_path, "plain.qgnn", save({"w": torch.zeros(3)}))
        _expect(ArtifactError, load_int_model, p)
        p = _write(tmp_path, "meta.qgnn", save({"w": torch.zeros(3)}, metadata={"qgnn.header": "{}"}))
        _expect(ArtifactError, load_int_model, p)

    def test_header_edits_with_recomputed_hashes(self, artifact_path, tmp_path):
        """Every header lie a hostile producer can write, checksums recomputed."""
        from qgnn_deploy.artifact import load_int_model

        def set_(path, value):
            def edit(h):
                obj = h
                for k in path[:-1]:
                    obj = obj[k] if not callable(k) else k(obj)
                obj[path[-1]] = value
            return edit

        conv = lambda h: _layer(h, "conv2d")  # noqa: E731
        lin = lambda h: _layer(h, "linear")  # noqa: E731
        bmm = lambda h: _layer(h, "bmm")  # noqa: E731
        fpc = lambda h: _layer(h, "conv2d_fp32")  # noqa: E731
        edits = {
            "version2": set_(["format_version"], 2),
            "version0": set_(["format_version"], 0),
            "versionstr": set_(["format_version"], "1"),
            "format": set_(["format"], "something/else"),
            "packing": set_(["packing"], "msb-planes"),
            "layers_none": set_(["layers"], None),
            "layers_dict": set_(["layers"], {"a": 1}),
            "generations_str": set_(["generations"], "2"),
            "generations_0": set_(["generations"], 0),
            "generations_big": set_(["generations"], 10 ** 9),
            "zero_point": set_(["zero_point"], "weird"),
            "config_none": set_(["config"], None),
            "config_unknown": set_(["config", "evil"], 1),
            "config_way": set_(["config", "way"], -3),
            "conv_wbits5": set_([conv, "w_bits"], 5),
            "conv_wbits_bool": set_([conv, "w_bits"], True),
            "conv_abits_str": set_([conv, "a_bits"], "4"),
            "conv_ascale_neg": set_([conv, "a_scale"], -1.0),
            "conv_ascale_zero": set_([conv, "a_scale"], 0.0),
            "conv_ascale_str": set_([conv, "a_scale"], "0.1"),
            "conv_aoffset_none": set_([conv, "a_offset"], None),
            "conv_kernel0": set_([conv, "kernel_size"], 0),
            "conv_stride0": set_([conv, "stride"], 0),
            "conv_pad_neg": set_([conv, "padding"], -1),
            "conv_cin_lie": set_([conv, "in_channels"], 7),
            "conv_cout_lie": set_([conv, "out_channels"], 3),
            "conv_cin_huge": set_([conv, "in_channels"], 10 ** 12),
            "conv_gran": set_([conv, "w_granularity"], "row"),
            "conv_wscale_neg": set_([conv, "w_scale"], -0.5),
            "conv_outquant_bad": set_([conv, "out_quant"], [0.0, 1.0]),
            "conv_outquant_bits": set_([conv, "out_quant"], [0.0, 1.0, 7]),
            "conv_kind": set_([conv, "kind"], "deconv"),
            "lin_in_lie": set_([lin, "in_features"], 3),
            "lin_out_neg": set_([lin, "out_features"], -1),
            "bmm_vscale": set_([bmm, "v_scale"], 0),
            "bmm_abits": set_([bmm, "a_bits"], 1),
            "name_none": set_([conv, "name"], None),
            "tensors_spec_short": set_([conv, "tensors", "w_packed"], ["U8"]),
        }
        for name, edit in edits.items():
            out = str(tmp_path / f"{name}.qgnn")
            _rewrite_artifact(artifact_path, out, edit_header=edit)
            _expect(ArtifactError, load_int_model, out)

    def test_layer_removed_or_duplicated(self, artifact_path, tmp_path):
        from qgnn_deploy.artifact import load_int_model

        def drop(tensors, header):
            rec = _layer(header, "conv2d")
            header["layers"].remove(rec)
            for attr in rec["tensors"]:
                del tensors[f"{rec['name']}.{attr}"]

        out = str(tmp_path / "drop.qgnn")
        _rewrite_artifact(artifact_path, out, edit_tensors=drop)
        _expect(ArtifactError, load_int_model, out)


    def test_duplicate_layer_record(self, artifact_path, tmp_path):
        from qgnn_deploy.artifact import load_int_model

        def dup(tensors, header):
            rec = dict(_layer(header, "bmm"))
            rec["a_scale"] = rec["a_scale"] * 3  # a second, different description of one layer
            header["layers"].append(rec)

        out = str(tmp_path / "dup.qgnn")
        _rewrite_artifact(artifact_path, out, edit_tensors=dup)
        _expect(ArtifactError, load_int_model, out)

    def test_wrong_dtype_and_nan_tensors(self, artifact_path, tmp_path):
        from qgnn_deploy.artifact import load_int_model

        def retype(tensors, header):
            rec = _layer(header, "conv2d")
            k = f"{rec['name']}.w_packed"
            t = tensors[k]
            pad = (-t.numel()) % 4
            f = torch.cat([t.flatten(), torch.zeros(pad, dtype=torch.uint8)]).view(torch.float32)
            tensors[k] = f.clone()
            rec["tensors"]["w_packed"] = ["F32", list(f.shape)]

        def reshape_(tensors, header):
            rec = _layer(header, "conv2d")
            k = f"{rec['name']}.w_packed"
            tensors[k] = tensors[k].flatten().clone()
            rec["tensors"]["w_packed"] = ["U8", list(tensors[k].shape)]

        def nan_post(tensors, header):
            rec = next(r for r in header["layers"] if "post_scale" in r.get("tensors", {}))
            k = f"{rec['name']}.post_scale"
            t = tensors[k].clone()
            t[0] = float("nan")
            tensors[k] = t

        def inf_fp(tensors, header):
            rec = _layer(header, "conv2d_fp32")
            k = f"{rec['name']}.weight"
            t = tensors[k].clone()
            t.view(-1)[0] = float("inf")
            tensors[k] = t

        def int32_packed(tensors, header):
            rec = _layer(header, "linear")
            k = f"{rec['name']}.w_packed"
            tensors[k] = tensors[k].to(torch.int32)
            rec["tensors"]["w_packed"] = ["I32", list(tensors[k].shape)]

        def header_lies_shape(tensors, header):
            rec = _layer(header, "linear")
            spec = rec["tensors"]["w_packed"]
            rec["tensors"]["w_packed"] = [spec[0], [spec[1][0] + 1, spec[1][1]]]

        def fp_weight_rank(tensors, header):
            rec = _layer(header, "conv2d_fp32")
            k = f"{rec['name']}.weight"
            tensors[k] = tensors[k].flatten(1).clone()
            rec["tensors"]["weight"] = ["F32", list(tensors[k].shape)]

        for fn in (retype, reshape_, nan_post, inf_fp, int32_packed, header_lies_shape,
                   fp_weight_rank):
            out = str(tmp_path / f"{fn.__name__}.qgnn")
            _rewrite_artifact(artifact_path, out, edit_tensors=fn)
            _expect(ArtifactError, load_int_model, out)

    def test_unhashed_edit_is_caught(self, artifact_path, tmp_path):
        from qgnn_deploy.artifact import load_int_model

        def poke(tensors, header):
            rec = _layer(header, "conv2d")
            k = f"{rec['name']}.w_packed"
            t = tensors[k].clone()
            t.view(-1)[0] ^= 1
            tensors[k] = t

        out = str(tmp_path / "poke.qgnn")
        _rewrite_artifact(artifact_path, out, edit_tensors=poke, rehash=False)
        _expect(ArtifactError, load_int_model, out)

    # -- bugs pinned for the owners of artifact.py / config.py (see the report) ---------

    def test_config_non_integer_widths(self, artifact_path, tmp_path):
        from qgnn_deploy.artifact import load_int_model
        out = str(tmp_path / "w.qgnn")
        _rewrite_artifact(artifact_path, out, edit_header=lambda h: h["config"].__setitem__("widths", ["x"] * 4))
        _expect(ArtifactError, load_int_model, out)

    def test_tensor_spec_shape_not_list(self, artifact_path, tmp_path):
        from qgnn_deploy.artifact import load_int_model
        out = str(tmp_path / "s.qgnn")
        _rewrite_artifact(artifact_path, out, edit_header=lambda h: _layer(h, "conv2d")["tensors"].__setitem__(
            "w_packed", ["U8", 5]))
        _expect(ArtifactError, load_int_model, out)

    def test_fp32_conv_stride_zero(self, artifact_path, tmp_path):
        from qgnn_deploy.artifact import load_int_model
        out = str(tmp_path / "fs.qgnn")
        _rewrite_artifact(artifact_path, out, edit_header=lambda h: _layer(h, "conv2d_fp32").__setitem__("stride", 0))
        _expect(ArtifactError, load_int_model, out)


# ================================================================== data set pickles

class _EvilReduce:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('x')",))


class _EvilSystem:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _cifar_fixture(root, data=None, meta=None, split_names=None):
    arch = root / "cifar-100-python"
    arch.mkdir(parents=True, exist_ok=True)
    names = [f"c{i}" for i in range(10)]
    rng = np.random.default_rng(0)
    if data is None:
        data = {b"data": rng.integers(0, 256, (40, 3072), dtype=np.uint8),
                b"fine_labels": [i % 10 for i in range(40)]}
    for part in ("train", "test"):
        with open(arch / part, "wb") as f:
            pickle.dump(data, f, protocol=2)
    with open(arch / "meta", "wb") as f:
        pickle.dump(meta if meta is not None else {b"fine_label_names": [n.encode() for n in names]}, f,
                    protocol=2)
    sp = root / "splits"
    sp.mkdir(exist_ok=True)
    split_names = split_names or {"train": names[:6], "val": names[6:8], "test": names[8:]}
    for s, ns in split_names.items():
        (sp / f"{s}.txt").write_text("\n".join(ns) + "\n")
    return str(root)


class TestDataFiles:
    def test_code_in_pickle_never_runs(self, tmp_path):
        from qgnn_deploy.data.safe_pickle import safe_load
        marker = tmp_path / "pwned"
        payloads = [_EvilReduce(marker), _EvilSystem(marker), {b"data": _EvilReduce(marker)},
                    [1, 2, {"x": _EvilSystem(marker)}]]
        for i, obj in enumerate(payloads):
            for proto in (0, 2, 4, 5):
                p = _write(tmp_path, f"e{i}_{proto}.pkl", pickle.dumps(obj, protocol=proto))
                _expect(DataError, safe_load, p)
        # through the real loaders: the archive's meta / train files and a miniImageNet split
        root = tmp_path / "cifar"
        _cifar_fixture(root, meta={b"fine_label_names": _EvilReduce(marker)})
        from qgnn_deploy.data.cifar_fs import load_cifar_fs
        _expect(DataError, load_cifar_fs, str(root))
        root2 = tmp_path / "cifar2"
        _cifar_fixture(root2, data={b"data": _EvilSystem(marker), b"fine_labels": []})
        _expect(DataError, load_cifar_fs, str(root2))
        mini = tmp_path / "mini"
        mini.mkdir()
        for s in ("train", "val", "test"):
            with open(mini / f"mini_imagenet_{s}.pickle", "wb") as f:
                pickle.dump({"evil": _EvilReduce(marker)}, f, protocol=4)
        from qgnn_deploy.data.mini_imagenet import load_mini_imagenet
        _expect(DataError, load_mini_imagenet, str(mini))
        assert not marker.exists(), "a data pickle executed code while loading"

    def test_disallowed_globals(self, tmp_path):
        from qgnn_deploy.data.safe_pickle import safe_load
        blobs = [b"cos\nsystem\n(S'true'\ntR.", b"cbuiltins\neval\n(S'1'\ntR.",
                 b"c__builtin__\nopen\n(S'/etc/passwd'\ntR.", b"cnumpy\nload\n(S'x'\ntR.",
                 b"csubprocess\nPopen\n(S'true'\ntR.", b"ctorch\nload\n(S'x'\ntR."]
        for i, b in enumerate(blobs):
            _expect(DataError, safe_load, _write(tmp_path, f"d{i}.pkl", b))

    def test_truncated_and_garbage_pickles(self, tmp_path):
        from qgnn_deploy.data.safe_pickle import safe_load
        good = pickle.dumps({b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [0, 1, 2, 3]},
                            protocol=2)
        for i, cut in enumerate([0, 1, 2, len(good) // 3, len(good) // 2, len(good) - 1]):
            _expect(DataError, safe_load, _write(tmp_path, f"t{i}.pkl", good[:cut]))
        rng = random.Random(5)
        for i in range(6):
            _expect(DataError, safe_load,
                    _write(tmp_path, f"g{i}.pkl", bytes(rng.randrange(256) for _ in range(512))))
        _expect(DataError, safe_load, str(tmp_path / "missing.pkl"))

    def test_ndarray_state_lies(self, tmp_path):
        """numpy array state whose shape disagrees with its bytes."""
        from qgnn_deploy.data.safe_pickle import safe_load
        good = pickle.dumps(np.zeros((4, 8), np.uint8), protocol=2)
        # shape (4, 8) -> (4000, 8): same 32 data bytes
        lie = good.replace(b"K\x04K\x08\x86", b"M\xa0\x0fK\x08\x86")
        assert lie != good
        _expect(DataError, safe_load, _write(tmp_path, "lie.pkl", lie))

    def test_length_claim_64gib(self, tmp_path):
        from qgnn_deploy.data.safe_pickle import safe_load
        blob = b"\x80\x04\x8e" + struct.pack("<Q", 2 ** 36) + b"abc"
        _expect(DataError, safe_load, _write(tmp_path, "big.pkl", blob))

    def test_ndarray_constructor_allocation(self, tmp_path):
        from qgnn_deploy.data.safe_pickle import safe_load
        # numpy.ndarray((10**12,), 'u1') via REDUCE; and (10**10,)
        for i, shape in enumerate([b"\x8a\x06\x00\x10\xa5\xd4\xe8\x00", b"\x8a\x05\x00\xe4\x0bT\x02"]):
            blob = b"\x80\x02cnumpy\nndarray\n(" + shape + b"\x85U\x02u1tR."
            _expect(DataError, safe_load, _write(tmp_path, f"nd{i}.pkl", blob))

    def test_cifar_malformed(self, tmp_path):
        from qgnn_deploy.data.cifar_fs import load_cifar_fs
        names = [f"c{i}" for i in range(10)]
        cases = {
            "no_dir": None,
            "data_wrong_width": dict(data={b"data": np.zeros((4, 100), np.uint8), b"fine_labels": [0] * 4}),
            "data_float": dict(data={b"data": np.zeros((4, 3072), np.float32), b"fine_labels": [0] * 4}),
            "labels_short": dict(data={b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [0]}),
            "labels_range": dict(data={b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [99] * 4}),
            "labels_neg": dict(data={b"data": np.zeros((4, 3072), np.uint8), b"fine_labels": [-1] * 4}),
            "no_labels": dict(data={b"data": np.zeros((4, 3072), np.uint8)}),
            "list_not_dict": dict(data=[1, 2, 3]),
            "meta_no_names": dict(meta={b"other": 1}),
            "meta_names_int": dict(meta={b"fine_label_names": 5}),
            "split_unknown": dict(split_names={"train": ["zzz"], "val": names[6:8], "test": names[8:]}),
            "split_overlap": dict(split_names={"train": names[:6], "val": names[5:8], "test": names[8:]}),
            "split_empty": dict(split_names={"train": names[:6], "val": [], "test": names[8:]}),
        }
        for name, kw in cases.items():
            root = tmp_path / name
            if kw is None:
                _expect(DataError, load_cifar_fs, str(root))
                continue
            _cifar_fixture(root, **kw)
            _expect(DataError, load_cifar_fs, str(root))

    def test_mini_imagenet_malformed(self, tmp_path):
        from qgnn_deploy.data.mini_imagenet import load_mini_imagenet
        img = np.zeros((3, 84, 84, 3), np.uint8)
        cases = {
            "wrong_dtype": {"a": img.astype(np.float32)},
            "wrong_rank": {"a": np.zeros((3, 84, 84), np.uint8)},
            "empty": {},
            "not_dict": [img],
            "labels_mismatch": {"data": img, "labels": ["a"]},
            "str_value": {"a": "not images"},
        }
        for name, obj in cases.items():
            root = tmp_path / name
            root.mkdir()
            for i, s in enumerate(("train", "val", "test")):
                # disjoint class names per split where the case has names
                o = obj
                if isinstance(obj, dict) and obj and "data" not in obj:
                    o = {f"{k}{i}": v for k, v in obj.items()}
                with open(root / f"mini_imagenet_{s}.pickle", "wb") as f:
                    pickle.dump(o, f, protocol=4)
            _expect(DataError, load_mini_imagenet, str(root))
        # csv layout: bad header, missing images, short rows
        for name, text in {"header": "a,b\nx.jpg,c\n", "short": "filename,label\nx.jpg\n",
                           "missing": "filename,label\nnope.jpg,c1\n"}.items():
            root = tmp_path / f"csv_{name}"
            (root / "images").mkdir(parents=True)
            for s in ("train", "val", "test"):
                (root / f"{s}.csv").write_text(text.replace("c1", f"c1{s}"))
            _expect(DataError, load_mini_imagenet, str(root))
        _expect(DataError, load_mini_imagenet, str(tmp_path / "nothing_here"))

    def test_mini_imagenet_class_dict_out_of_range(self, tmp_path):
        from qgnn_deploy.data.mini_imagenet import load_mini_imagenet
        img = np.zeros((3, 84, 84, 3), np.uint8)
        for i, s in enumerate(("train", "val", "test")):
            with open(tmp_path / f"mini_imagenet_{s}.pickle", "wb") as f:
                pickle.dump({"image_data": img, "class_dict": {f"c{i}": [0, 1, 99]}}, f, protocol=4)
        _expect(DataError, load_mini_imagenet, str(tmp_path))

    def test_cub_corrupt_images(self, tmp_path):
        pytest.importorskip("PIL")
        from qgnn_deploy.data.cub import load_cub
        root = tmp_path / "CUB_200_2011" / "images"
        for c in range(8):
            d = root / f"{c:03d}.class{c}"
            d.mkdir(parents=True)
            (d / "a.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" if c == 0 else b"garbage")
        ds = load_cub(str(tmp_path))
        cls = ds.split_classes("train")[0]
        _expect(DataError, ds.load, torch.tensor([cls]), torch.tensor([0]))
        # empty class folder / missing images dir
        (root / "008.empty").mkdir()
        _expect(DataError, load_cub, str(tmp_path))
        _expect(DataError, load_cub, str(tmp_path / "nowhere"))


# ================================================================== ONNX files

class TestOnnxFiles:
    def _session(self):
        pytest.importorskip("onnxruntime")
        try:
            from qgnn_deploy.backends.onnx import OnnxSession
        except ImportError:
            pytest.skip("qgnn_deploy.backends.onnx not available")
        return OnnxSession

    def test_corrupt_onnx(self, tmp_path):
        OnnxSession = self._session()
        rng = random.Random(4)
        for i, blob in enumerate([b"", b"\x08\x07garbage", bytes(rng.randrange(256) for _ in range(2048))]):
            _expect(QGNNError, OnnxSession, _write(tmp_path, f"c{i}.onnx", blob))
        _expect(QGNNError, OnnxSession, str(tmp_path / "missing.onnx"))

    def _tiny_onnx(self, meta):
        onnx = pytest.importorskip("onnx")
        from onnx import TensorProto, helper
        g = helper.make_graph([helper.make_node("Identity", ["x"], ["logits"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1])])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        for k, v in meta.items():
            e = m.metadata_props.add()
            e.key, e.value = k, v
        return m.SerializeToString()

    def test_truncated_onnx(self, tmp_path):
        OnnxSession = self._session()
        blob = self._tiny_onnx({})
        for cut in (1, len(blob) // 2, len(blob) - 3):
            _expect(QGNNError, OnnxSession, _write(tmp_path, "t.onnx", blob[:cut]))

    def test_onnx_with_garbage_config_metadata(self, tmp_path):
        OnnxSession = self._session()
        p = _write(tmp_path, "m.onnx", self._tiny_onnx({"qgnn_deploy.config": "{not json"}))
        _expect(QGNNError, OnnxSession, p)


# ================================================================== CLI on hostile files

def test_cli_report_on_corrupt_files(artifact_path, ckpt_path, tmp_path):
    """The same files through ``python -m qgnn_deploy report``: one error line, exit != 0."""
    from qgnn_deploy.cli import _command_module
    if _command_module("report") is None:
        pytest.skip("report command not available")
    data = open(artifact_path, "rb").read()
    files = [_write(tmp_path, "trunc.qgnn", data[: len(data) // 2]),
             _write(tmp_path, "garbage.pt", b"\x00" * 100)]
    for f in files:
        r = subprocess.run([sys.executable, "-m", "qgnn_deploy", "report", f, "--json"],
                           capture_output=True, text=True, cwd=REPO, timeout=120)
        assert r.returncode != 0
        assert "Traceback" not in r.stderr
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert lines and lines[-1].startswith("error: "), r.stderr
        assert os.path.basename(f) in r.stderr
        assert r.stdout.strip() == ""
