"""ISA dispatch of the cpu kernels: detection, forcing, QGNN_CPU_ISA errors, AMX detection.

Detection is checked against the kernel's own view of the CPU (/proc/cpuinfo flags);
the AMX decision additionally with synthetic CPUID / XCR0 values, since this test must
also mean something on CPUs without AMX.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from qgnn_deploy.errors import BackendUnavailableError, KernelArgumentError

cpu = pytest.importorskip("qgnn_deploy.backends.cpu")
if not cpu.is_available():  # pragma: no cover
    pytest.skip("qgnn_deploy._C not built (pip install -e .)", allow_module_level=True)

ROOT = Path(__file__).resolve().parents[1]


def _cpu_flags():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), None)
    if line is None:
        pytest.skip("/proc/cpuinfo has no flags line (not x86)")
    return set(line.split(":", 1)[1].split())


# ------------------------------------------------------------------ detection

def test_isa_names_match_the_extension_and_dispatch_order():
    assert cpu.ISAS == tuple(cpu._ext().isa_names()) == ("scalar", "avx2", "avxvnni", "avx512vnni", "amx")
    avail = cpu.available_isas()
    assert avail[0] == "scalar"
    # AMX runs its epilogue on AVX-512: never runnable without that path
    assert "amx" not in avail or "avx512vnni" in avail
    assert cpu.detected_isa() == avail[-1]  # the fastest runnable path
    assert avail == sorted(avail, key=cpu.ISAS.index)


def test_available_isas_follow_the_cpu_flags():
    flags = _cpu_flags()
    want = {
        "avx2": {"avx2", "fma"},
        "avxvnni": {"avx2", "fma", "avx_vnni"},
        "avx512vnni": {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "bmi2", "fma"},
    }
    for isa, needs in want.items():
        has = needs <= flags
        assert (isa in cpu.available_isas()) == has, isa
        blocker = cpu.isa_blocker(isa)
        assert (blocker == "") == has
        if blocker:
            assert blocker.startswith("the CPU lacks ")


def test_amx_probe_reads_this_cpu():
    flags = _cpu_flags()
    p = cpu.amx_probe()
    assert bool(p["leaf7_edx"] >> 24 & 1) == ("amx_tile" in flags)
    assert bool(p["leaf7_edx"] >> 25 & 1) == ("amx_int8" in flags)
    assert bool(p["leaf7_edx"] >> 22 & 1) == ("amx_bf16" in flags)
    if "avx" in flags:  # the OS saves SSE and AVX state (XCR0 bits 1, 2), so XGETBV works
        assert p["osxsave"] and p["xcr0"] & 0b110 == 0b110
    if "avx512f" in flags:  # opmask, ZMM_Hi256, Hi16_ZMM (XCR0 bits 5-7)
        assert p["xcr0"] >> 5 & 7 == 7
    assert p["blocker"] == cpu._ext().amx_blocker(**{k: v for k, v in p.items() if k != "blocker"})
    amx = cpu.isa_blocker("amx")
    if "amx_tile" not in flags:
        assert "AMX-TILE is clear" in p["blocker"] and amx == p["blocker"]
        assert p["perm_errno"] == -1  # the permission is only asked for with AMX hardware
    elif p["blocker"]:
        assert amx == p["blocker"]
    else:  # tiles usable: runnable exactly when the AVX-512 path (its epilogue) is
        assert p["perm_errno"] == 0
        assert (amx == "") == (cpu.isa_blocker("avx512vnni") == "")
        assert amx == "" or amx.startswith("the CPU has AMX-INT8 but lacks ")


# A Sapphire Rapids as CPUID / XGETBV report it: AMX-BF16/TILE/INT8, tile state on,
# palette 1 = 8 tiles of 16 rows x 64 bytes (8192 bytes in all, 1024 per tile).
SPR = dict(max_leaf=0x20, leaf7_edx=(1 << 22) | (1 << 24) | (1 << 25), osxsave=True, xcr0=0x602E7, palettes=1,
           pal1_eax=8192 | (1024 << 16), pal1_ebx=64 | (8 << 16), pal1_ecx=16, perm_errno=0)


@pytest.mark.parametrize("change,reason", [
    ({}, ""),
    (dict(max_leaf=6), "AMX-TILE is clear"),
    (dict(leaf7_edx=1 << 25), "AMX-TILE is clear"),
    (dict(leaf7_edx=1 << 24), "no AMX-INT8"),
    (dict(osxsave=False), "XSAVE"),
    (dict(xcr0=0x602E7 & ~(1 << 18)), "XCR0 bits 17 XTILECFG / 18 XTILEDATA"),
    (dict(xcr0=0x2E7), "XCR0 bits 17"),
    (dict(max_leaf=0x1C), "no tile palette 1"),
    (dict(palettes=0), "no tile palette 1"),
    (dict(pal1_ebx=32 | (8 << 16)), "8 tiles of 16 rows x 32 bytes"),
    (dict(pal1_ecx=8), "8 tiles of 8 rows x 64 bytes"),
    (dict(perm_errno=-1), "not requested"),
    (dict(perm_errno=22), "refused the AMX tile-data permission"),
])
def test_amx_decision_on_synthetic_registers(change, reason):
    why = cpu._ext().amx_blocker(**{**SPR, **change})
    assert (why == "") == (reason == "")
    assert reason in why
    if change.get("perm_errno") == 22:
        assert os.strerror(22) in why and "ARCH_REQ_XCOMP_PERM" in why


# ------------------------------------------------------------------ forcing

def test_force_isa_runs_every_available_path_and_rejects_the_rest():
    unforced = os.environ.get("QGNN_CPU_ISA", "auto") or "auto"  # what force_isa(None) goes back to
    unforced = cpu.detected_isa() if unforced == "auto" else unforced
    try:
        for isa in cpu.available_isas():
            cpu.force_isa(isa)
            assert cpu.active_isa() == isa
        cpu.force_isa(None)
        assert cpu.active_isa() == unforced
        cpu.force_isa("auto")
        assert cpu.active_isa() == unforced
        with pytest.raises(KernelArgumentError, match="choose one of auto, scalar, avx2, avxvnni, avx512vnni, amx"):
            cpu.force_isa("avx512")
        for isa in set(cpu.ISAS) - set(cpu.available_isas()):
            with pytest.raises(BackendUnavailableError) as err:
                cpu.force_isa(isa)
            msg = str(err.value)
            assert cpu.isa_blocker(isa) in msg and "this CPU runs " + ", ".join(cpu.available_isas()) in msg
            assert cpu.active_isa() == unforced  # a refused force changes nothing
    finally:
        cpu.force_isa(None)
    with pytest.raises(KernelArgumentError):
        cpu.isa_blocker("auto")


# ------------------------------------------------------------------ QGNN_CPU_ISA (read once per process)

# the raw extension only (no torch import: ~0.1 s a process); every kind of entry point
PROBE = """
import json
import numpy as np
import qgnn_deploy._C as C
pw = C.PackedWeights(np.zeros((2, 4), np.uint8), 4, 8, 1)
one, zero = np.ones(2, np.float32), np.zeros(2, np.float32)
calls = [("active", C.active_isa),
         ("qlinear", lambda: C.qlinear(np.zeros((3, 8), np.uint8), pw, 4, one, zero, 0.1, 0.0)),
         ("qconv2d", lambda: C.qconv2d(np.zeros((1, 2, 2, 8), np.uint8), pw, 4, 1, 1, 0, one, zero, 0.1, 0.0)),
         ("qbmm", lambda: C.qbmm(np.zeros((1, 3, 3), np.uint8), np.zeros((1, 3, 2), np.uint8), 4, 4, 0.1, 0, 0.1, 0)),
         ("quantize", lambda: C.quantize(np.zeros(4, np.float32), 0.0, 0.1, 4))]
out = {}
for name, call in calls:
    try:
        r = call()
        out[name] = r if isinstance(r, str) else "ok"
    except (C.KernelArgumentError, C.IsaUnavailableError) as e:
        out[name] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"""


def _probe(value):
    env = {k: v for k, v in os.environ.items() if k != "QGNN_CPU_ISA"}
    if value is not None:
        env["QGNN_CPU_ISA"] = value
    r = subprocess.run([sys.executable, "-c", PROBE], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_env_picks_a_path_and_unknown_or_unrunnable_values_are_errors():
    best, avail = cpu.detected_isa(), cpu.available_isas()
    ok = {"qlinear": "ok", "qconv2d": "ok", "qbmm": "ok", "quantize": "ok"}
    for value in (None, "", "auto"):
        assert _probe(value) == {"active": best, **ok}
    for res in _probe("sse9").values():  # every entry point raises, none falls back to auto
        assert res.startswith("KernelArgumentError: QGNN_CPU_ISA: unknown ISA 'sse9'; choose one of auto, scalar")
        assert "this CPU runs " + ", ".join(avail) in res
    for isa in cpu.ISAS:
        if isa in avail:
            assert _probe(isa) == {"active": isa, **ok}
        else:  # every entry point raises, naming the reason
            for res in _probe(isa).values():
                assert res.startswith(f"IsaUnavailableError: QGNN_CPU_ISA={isa} cannot run here: " + cpu.isa_blocker(isa))


def test_cli_exits_2_on_a_bad_env_value():
    env = {**os.environ, "QGNN_CPU_ISA": "avx1024"}
    r = subprocess.run([sys.executable, "-m", "qgnn_deploy", "run", "--preset", "tiny", "--bits", "4",
                        "--backend", "cpu", "--episodes", "1", "--json"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == ""
    assert "error: QGNN_CPU_ISA: unknown ISA 'avx1024'; choose one of auto, scalar, avx2, avxvnni" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("name, value", [("QGNN_CPU_THREADS", "0"), ("QGNN_CPU_THREADS", "two"),
                                         ("QGNN_CPU_SPIN_US", "-5"), ("QGNN_CPU_SPIN_US", "2000000")])
def test_cli_exits_2_on_bad_thread_environment_values(name, value):
    env = {**os.environ, name: value}
    r = subprocess.run([sys.executable, "-m", "qgnn_deploy", "run", "--preset", "tiny", "--bits", "4",
                        "--backend", "cpu", "--episodes", "1", "--json"],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert f"error: {name}={value!r}: expected an integer in" in r.stderr
    assert "Traceback" not in r.stderr


def test_run_json_names_the_isa_it_ran_on(capsys):
    from qgnn_deploy.cli import main
    isa = cpu.available_isas()[-2] if len(cpu.available_isas()) > 1 else "scalar"
    cpu.force_isa(isa)
    try:
        assert main(["run", "--preset", "tiny", "--bits", "4", "--backend", "cpu", "--episodes", "1",
                     "--threads", "1", "--json"]) == 0
    finally:
        cpu.force_isa(None)
        cpu.set_num_threads(None)  # --threads set it for the process
    out = json.loads(capsys.readouterr().out)
    assert out["isa"] == isa and out["agreement_with_reference"] == 1.0
    assert main(["run", "--preset", "tiny", "--bits", "4", "--backend", "reference", "--episodes", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["isa"] is None
