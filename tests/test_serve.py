"""``qgnn-deploy serve`` (docs/serving.md).

Request validation in plain Python (every rejection: status and a message naming the
problem), the command's checks that run before Ray, then one real local Ray + Serve
instance (module fixture, ~20 s on 2 cores) for the routes, bit-exact answers, batching
under load and rejection of bad requests amid good ones. Without Ray Serve installed the
server tests skip, except under CI, where they fail.
"""
from __future__ import annotations

import asyncio
import importlib
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass

import pytest
import torch

from qgnn_deploy.cli import main
from qgnn_deploy.config import preset_config
from qgnn_deploy.data import calibration_episodes
from qgnn_deploy.serving import ServeSettings
from qgnn_deploy.serving.loadtest import make_payloads, run_load
from qgnn_deploy.serving.validate import RequestError, check_content_length, parse_episodes, read_body

# Ray Serve's own pydantic models warn on import: not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray")

CONFIG = preset_config("tiny", 4)  # 5-way 1-shot, 10 images of 3x32x32 per task
MAX_TASKS = 8


def _doc(tasks: int = 1) -> dict:
    images, labels = calibration_episodes(CONFIG, tasks=tasks, seed=0)
    return {"images": images.tolist(), "support_labels": labels.tolist()}


def _with_first_pixel(doc: dict, literal: str) -> str:
    """``doc`` as JSON text with images[0][0][0][0][0] written as ``literal``."""
    doc["images"][0][0][0][0][0] = "FIRST-PIXEL"
    return json.dumps(doc).replace('"FIRST-PIXEL"', literal)


def _rejected(body, status: int, *words: str) -> str:
    """parse_episodes(body) must raise RequestError(status) whose message has every word."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body)
    if isinstance(body, str):
        body = body.encode()
    with pytest.raises(RequestError) as e:
        parse_episodes(body, CONFIG, MAX_TASKS)
    msg = str(e.value)
    assert e.value.status == status, msg
    for w in words:
        assert w in msg, msg
    return msg


# ------------------------------------------------------------------ validation (no Ray)

def test_valid_body_gives_the_episode_tensors():
    images, labels = calibration_episodes(CONFIG, tasks=2, seed=0)
    body = json.dumps({"images": images.tolist(), "support_labels": labels.tolist()}).encode()
    got_images, got_labels = parse_episodes(body, CONFIG, MAX_TASKS)
    assert got_images.dtype == torch.float32 and got_labels.dtype == torch.int64
    assert torch.equal(got_images, images) and torch.equal(got_labels, labels)


@pytest.mark.parametrize("body,words", [
    (b"", ["empty body"]),
    (b"{\"images\": [1,", ["not valid JSON", "line 1"]),
    (b"\xff\xfe\x00garbage", ["not valid JSON"]),
    (b"{\"images\": [NaN], \"support_labels\": []}", ["NaN"]),
    (b"{\"images\": [Infinity], \"support_labels\": []}", ["Infinity"]),
    (b"{\"images\": [-Infinity], \"support_labels\": []}", ["-Infinity"]),
    (b"[" * 100_000 + b"]" * 100_000, ["nested too deeply"]),
])
def test_non_json_is_400(body, words):
    _rejected(body, 400, *words)


def test_wrong_structure_is_422_naming_the_key():
    _rejected([1, 2], 422, "JSON object", "an array")
    _rejected({"images": []}, 422, "missing key 'support_labels'")
    _rejected({"support_labels": []}, 422, "missing key 'images'")
    _rejected({**_doc(), "extra": 1}, 422, "unknown key 'extra'")
    _rejected({"images": "x", "support_labels": []}, 422, "images is a string")
    _rejected({"images": [], "support_labels": []}, 422, "no tasks")
    doc = _doc()
    doc["support_labels"] = doc["support_labels"] * 2
    _rejected(doc, 422, "support_labels has 2 tasks, images has 1")


def test_too_many_tasks_is_413():
    _rejected({"images": [[]] * (MAX_TASKS + 1), "support_labels": [[]] * (MAX_TASKS + 1)}, 413,
              f"{MAX_TASKS + 1} tasks", f"limit of {MAX_TASKS}", "--max-batch-tasks")


def test_wrong_nesting_is_422_naming_the_position():
    doc = _doc()
    doc["images"][0].pop()
    _rejected(doc, 422, "images[0] has 9 entries, expected 10", "[1][10][3][32][32]")
    doc = _doc()
    doc["images"][0][4] = doc["images"][0][4][:2]
    _rejected(doc, 422, "images[0][4] has 2 entries, expected 3")
    doc = _doc()
    doc["images"][0][1][2][5].append(0.5)
    _rejected(doc, 422, "images[0][1][2][5] has 33 entries, expected 32")
    doc = _doc()
    doc["images"][0][1][2][5] = 0.5
    _rejected(doc, 422, "images[0][1][2][5] is a number, expected an array of 32")
    doc = _doc()
    doc["support_labels"] = [[0, 1, 2]]
    _rejected(doc, 422, "support_labels[0] has 3 entries, expected 5")


@pytest.mark.parametrize("value,kind", [("0.5", "a string"), (True, "a boolean"), (None, "null"),
                                        ({"v": 1}, "an object")])
def test_non_number_pixel_is_422(value, kind):
    doc = _doc()
    doc["images"][0][3][1][7][9] = value
    _rejected(doc, 422, f"images[0][3][1][7][9] is {kind}, expected a number")


@pytest.mark.parametrize("literal,words", [("1e999", ["images[0][0][0][0][0] is not finite"]),
                                           ("1e39", ["images[0][0][0][0][0] is not finite in float32"]),
                                           ("1" + "0" * 400, ["too large for float32"])])
def test_non_finite_pixel_is_422(literal, words):
    _rejected(_with_first_pixel(_doc(), literal), 422, *words)


@pytest.mark.parametrize("label,words", [(5, ["support_labels[0][2] = 5 is outside [0, 5)"]),
                                         (-1, ["= -1 is outside [0, 5)"]),
                                         (1.0, ["support_labels[0][2] is a number", "an integer class"]),
                                         (True, ["is a boolean"]), ("1", ["is a string"])])
def test_bad_label_is_422(label, words):
    doc = _doc()
    doc["support_labels"][0][2] = label
    _rejected(doc, 422, *words)


def test_content_length_limit():
    check_content_length(None, 100)
    check_content_length("100", 100)
    with pytest.raises(RequestError) as e:
        check_content_length("101", 100)
    assert e.value.status == 413 and "101 bytes" in str(e.value) and "--max-body-mb" in str(e.value)
    with pytest.raises(RequestError) as e:
        check_content_length("lots", 100)
    assert e.value.status == 400 and "Content-Length" in str(e.value)


def test_read_body_stops_at_the_limit():
    async def chunks(n, size):
        for _ in range(n):
            yield b"x" * size

    assert asyncio.run(read_body(chunks(4, 25), 100)) == b"x" * 100
    with pytest.raises(RequestError) as e:
        asyncio.run(read_body(chunks(1000, 25), 100))
    assert e.value.status == 413 and "100 bytes" in str(e.value)


# ------------------------------------------------------------------ the command, before Ray

def test_import_and_help_do_not_import_ray():
    code = ("import sys, qgnn_deploy, qgnn_deploy.serving.validate, qgnn_deploy.serving.loadtest\n"
            "from qgnn_deploy.cli import build_parser\n"
            "build_parser().parse_args(['serve', 'm.qgnn'])\n"
            "assert 'ray' not in sys.modules, 'ray was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.parametrize("flags,words", [(["--replicas", "0"], "--replicas must be an integer >= 1"),
                                         (["--batch-wait-ms", "-1"], "--batch-wait-ms"),
                                         (["--max-body-mb", "0"], "--max-body-mb"),
                                         (["--port", "70000"], "--port"),
                                         (["--address", "auto", "--num-cpus", "2"], "--num-cpus")])
def test_bad_flags_exit_2(flags, words, capsys):
    assert main(["serve", "model.qgnn", *flags]) == 2
    assert words in capsys.readouterr().err


def test_without_ray_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)
    monkeypatch.setitem(sys.modules, "ray.serve", None)
    assert main(["serve", "model.qgnn"]) == 2
    err = capsys.readouterr().err
    assert "Ray Serve" in err and "pip install 'qgnn-deploy[serve]'" in err


# ------------------------------------------------------------------ a real Ray Serve instance

SETTINGS = ServeSettings(replicas=1, threads=1, max_batch_tasks=MAX_TASKS, batch_wait_ms=20.0, max_body_mb=2.0)


@dataclass
class Server:
    url: str
    port: int
    model: object  # the IntModel served, in process, on the same backend


def _serving_app():
    """qgnn_deploy.serving.app; skips without Ray Serve, fails under CI."""
    try:
        importlib.import_module("ray.serve")
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the serving tests, but Ray Serve is not importable ({e}): "
                        "pip install -e '.[serve]'")
        pytest.skip(f"Ray Serve not installed ({e}): pip install -e '.[serve]'")
    from qgnn_deploy.serving import app
    return app


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    serving_app = _serving_app()
    import qgnn_deploy
    from qgnn_deploy.sources import embedded_checkpoint
    model = qgnn_deploy.fold(qgnn_deploy.load_checkpoint(embedded_checkpoint("tiny", 4)))
    path = str(tmp_path_factory.mktemp("serve") / "tiny4.qgnn")
    qgnn_deploy.save_int_model(model, path)
    model.backend = "cpu"
    port = _free_port()
    local = serving_app.start_ray(num_cpus=2)
    running = None
    try:
        running = serving_app.deploy(path, SETTINGS, "127.0.0.1", port)
        yield Server(running.url, port, model)
    finally:
        serving_app.stop(running, local)


def _request(server: Server, method: str, path: str, body=None, headers=None, encode_chunked=False):
    """(status, JSON object) of one request."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=encode_chunked)
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


def _episode_body(tasks: int, seed: int = 0):
    images, labels = calibration_episodes(CONFIG, tasks=tasks, seed=seed)
    return images, labels, json.dumps({"images": images.tolist(), "support_labels": labels.tolist()})


def test_health(server):
    status, info = _request(server, "GET", "/v1/health")
    assert status == 200 and info["status"] == "ok"
    assert (info["way"], info["shot"], info["num_nodes"], info["image_size"], info["backend"]) == (5, 1, 10, 32, "cpu")
    assert info["max_batch_tasks"] == MAX_TASKS


@pytest.mark.parametrize("tasks", [1, 3])
def test_answers_equal_the_in_process_model(server, tasks):
    images, labels, body = _episode_body(tasks)
    status, out = _request(server, "POST", "/v1/episodes", body, {"Content-Type": "application/json"})
    assert status == 200, out
    expected = server.model(images, labels).logits
    logits = torch.tensor(out["logits"], dtype=torch.float32)
    assert logits.shape == (tasks, 5, 5)
    assert torch.equal(logits, expected)  # same backend, batch-invariant: bit-identical
    assert out["predictions"] == expected.argmax(-1).tolist()


def test_load_is_batched_without_errors(server):
    payloads = make_payloads(CONFIG, tasks=1, count=4, model=server.model)
    res = run_load(server.url, payloads, clients=4, requests=40, time_limit_s=60)
    assert res["errors"] == 0 and res["mismatches"] == 0, res["error_samples"]
    assert res["ok"] == 40 and res["batching"]["requests"] == 40
    assert res["batching"]["max_requests_per_call"] > 1, res["batching"]  # one call served several requests


def test_bad_requests_get_4xx_json_and_the_server_goes_on(server):
    _, _, body = _episode_body(1)
    status, out = _request(server, "POST", "/v1/episodes", b"{\"images\": [NaN]")
    assert status == 400 and "NaN" in out["error"]
    status, out = _request(server, "POST", "/v1/episodes", _with_first_pixel(_doc(), '"a"'))
    assert status == 422 and "is a string" in out["error"]
    big = b"[" + b"0.0, " * 500_000 + b"0.0]"  # 2.4 MiB: over the fixture's 2 MiB
    status, out = _request(server, "POST", "/v1/episodes", big)
    assert status == 413 and "Content-Length" not in out["error"] and "bytes" in out["error"]
    status, out = _request(server, "POST", "/v1/episodes", iter([big[:2**20], big[2**20:]]), encode_chunked=True)
    assert status == 413 and "--max-body-mb" in out["error"]  # no Content-Length: counted as it arrives
    status, out = _request(server, "GET", "/v1/episodes")
    assert status == 405 and "POST" in out["error"]
    status, out = _request(server, "GET", "/v2/nothing")
    assert status == 404 and "/v1/episodes" in out["error"]
    status, out = _request(server, "POST", "/v1/episodes", body)
    assert status == 200 and len(out["predictions"]) == 1


def test_a_bad_request_never_fails_its_batch_mates(server):
    images, labels, body = _episode_body(2, seed=5)
    expected = server.model(images, labels).logits
    results = []

    def send(payload):
        results.append((payload is body, *_request(server, "POST", "/v1/episodes", payload)))

    bad = _with_first_pixel(json.loads(body), "1e999")
    threads = [threading.Thread(target=send, args=(body if i % 2 else bad,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for good, status, out in results:
        if good:
            assert status == 200 and torch.equal(torch.tensor(out["logits"]), expected), out
        else:
            assert status == 422 and "not finite" in out["error"]
    status, stats = _request(server, "GET", "/v1/stats")
    assert status == 200 and stats["total"]["requests"] >= 4 and stats["replica"] in stats["replicas"]
