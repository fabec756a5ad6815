"""The package's public names (``qgnn_deploy.__all__``) are the documented objects, and stay
so after every submodule is imported: ``qgnn_deploy.fold`` is both a submodule and the
exported function, and importing the submodule used to replace the function with the module
(``q.fold(m); q.fold(m)`` raised ``TypeError: 'module' object is not callable``)."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: exported name -> the module that defines it (what the README and DESIGN document)
DOCUMENTED = {
    "ModelConfig": "qgnn_deploy.config",
    "preset_config": "qgnn_deploy.config",
    "PRESETS": "qgnn_deploy.config",
    "build_model": "qgnn_deploy.models",
    "QGNNModel": "qgnn_deploy.models",
    "save_checkpoint": "qgnn_deploy.checkpoint",
    "load_checkpoint": "qgnn_deploy.checkpoint",
    "load_official_dpgn": "qgnn_deploy.checkpoint",
    "fold": "qgnn_deploy.fold",
    "IntModel": "qgnn_deploy.intmodel",
    "load_int_model": "qgnn_deploy.artifact",
    "save_int_model": "qgnn_deploy.artifact",
    "export_onnx": "qgnn_deploy.export",
    "count_bit_flops": "qgnn_deploy.report",
}

_SCRIPT = r"""
import importlib, json, os, pkgutil, sys, tempfile
import qgnn_deploy as q

documented = json.loads(sys.argv[1])
assert sorted(q.__all__) == sorted(list(documented) + ["__version__"]), q.__all__

# every submodule, the source-checkout subpackages included (__main__ would run the CLI)
pkg_dir = os.path.dirname(q.__file__)
names = [m.name for m in pkgutil.walk_packages([pkg_dir], "qgnn_deploy.")]
for sub in ("qgnn_deploy.kernels", "qgnn_deploy.export"):
    names += [sub] + [m.name for m in pkgutil.walk_packages(importlib.import_module(sub).__path__, sub + ".")]
imported = []
for name in names:
    if name.rsplit(".", 1)[-1] != "__main__":
        importlib.import_module(name)
        imported.append(name)
assert {"qgnn_deploy.fold", "qgnn_deploy.export.int_layers", "qgnn_deploy.kernels.qgemm",
        "qgnn_deploy.backends.onnx"} <= set(imported), imported

for name, module in documented.items():
    got = getattr(q, name)
    want = getattr(sys.modules[module], name)
    assert got is want, (name, got, want)
    assert not isinstance(got, type(sys)), (name, "is a module")
from qgnn_deploy import fold as from_import
assert from_import is sys.modules["qgnn_deploy.fold"].fold

tmp = tempfile.mkdtemp()
for _ in range(2):  # every function works twice
    cfg = q.preset_config("tiny", 4)
    assert isinstance(cfg, q.ModelConfig) and "tiny" in q.PRESETS
    assert isinstance(q.build_model(cfg), q.QGNNModel)
    model = q.load_checkpoint(os.path.join(pkg_dir, "assets", "tiny-w4.pt"))
    q.save_checkpoint(model, os.path.join(tmp, "m.pt"))
    model = q.load_checkpoint(os.path.join(tmp, "m.pt"))
    from qgnn_deploy.checkpoint import to_official_dpgn
    fp = q.load_official_dpgn(to_official_dpgn(q.build_model(q.preset_config("tiny"))), q.preset_config("tiny"))
    assert isinstance(fp, q.QGNNModel)
    im = q.fold(model, zero_point="exact")
    assert isinstance(im, q.IntModel)
    q.save_int_model(im, os.path.join(tmp, "m.qgnn"))
    assert isinstance(q.load_int_model(os.path.join(tmp, "m.qgnn")), q.IntModel)
    assert q.export_onnx(im, os.path.join(tmp, "m.onnx"))["bytes"] > 0
    assert q.count_bit_flops(model).total()["bit_flops"] > 0
print("ok")
"""


def test_public_names_survive_importing_every_submodule():
    import json
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(DOCUMENTED)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout[-2000:] + r.stderr[-4000:]


def test_submodule_import_after_the_function_keeps_the_function():
    # the order of the original report: the function first, then a submodule import
    code = ("import qgnn_deploy as q; f = q.fold; import qgnn_deploy.fold; "
            "from qgnn_deploy.fold import compare_engines; "
            "assert q.fold is f and callable(q.fold), q.fold; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
