"""The Ray Serve example (python -m resnet_fused.serve) started here as a user starts it: concurrent
requests from an HTTP client, every answer checked against eager, batching and replicas seen,
bad requests answered 400, and a clean shutdown on SIGINT."""

import concurrent.futures
import copy
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest
import torch

import resnet_fused
from conftest import assert_accuracy_rule, randomize_bn

import models

pytest.importorskip(
    "ray.serve",
    reason="Ray Serve is not installed here (pip install .[serve]); CI installs it in the CPU-only venv only",
)
psutil = pytest.importorskip("psutil")

REPLICAS = 2
REQUESTS = 48
CLIENTS = 12


@pytest.fixture(scope="module", autouse=True)
def _rng_neutral():
    """These tests leave the global RNG as they found it, so that the tests after them draw the
    inputs they drew before these existed (some of those pass on most draws only)."""
    with torch.random.fork_rng():
        yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, payload) -> tuple:
    data = json.dumps(payload).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def _read_lines(stream, lines: "queue.Queue"):
    for line in iter(stream.readline, ""):
        lines.put(line)
    lines.put(None)


@pytest.mark.slow
def test_ray_serve(tmp_path):
    torch.manual_seed(0)
    model = randomize_bn(models.CifarResNet(num_blocks=(1, 1), widths=(16, 32), num_classes=10)).eval()
    path = tmp_path / "fused.pt"
    torch.save(resnet_fused.fuse(model), path)
    images = torch.randn(REQUESTS, 3, 16, 16)
    with torch.inference_mode():
        eager = model(images)
        ref = copy.deepcopy(model).double()(images.double())

    port = _free_port()
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    server = subprocess.Popen(
        [sys.executable, "-m", "resnet_fused.serve", str(path), "--input-shape", "3", "16", "16",
         "--replicas", str(REPLICAS), "--max-batch-size", "8", "--batch-wait-ms", "20", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=str(tmp_path),
        start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(server.stdout, lines), daemon=True).start()
    log = []
    try:
        deadline = time.monotonic() + 240
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None or time.monotonic() > deadline:
                pytest.fail("the server did not come up:\n" + "".join(log[-60:]))
            log.append(line)
            if "resnet_fused: serving" in line:
                break
        url = f"http://127.0.0.1:{port}/"
        descendants = psutil.Process(server.pid).children(recursive=True)
        assert descendants, "Ray started no processes of its own?"

        with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
            answers = list(pool.map(lambda i: _post(url, {"image": images[i].tolist()}), range(REQUESTS)))
        for i, (status, body) in enumerate(answers):
            assert status == 200, (i, status, body)
            out = torch.tensor(body["logits"], dtype=torch.float32)[None]
            assert_accuracy_rule(out, [eager[i:i + 1]], ref[i:i + 1], what=f"request {i} (batch {body['batch_size']})")
            assert out.argmax().item() == eager[i].argmax().item(), f"request {i}: prediction differs from eager's"
        assert max(b["batch_size"] for _, b in answers) > 1, "no request was batched with another"
        assert len({b["replica"] for _, b in answers}) == REPLICAS, "not every replica served"

        status, body = _post(url, {"image": images[0, :, :8].tolist()})
        assert status == 400 and "shape [3, 16, 16]" in body["error"], (status, body)
        status, body = _post(url, {"picture": 1})
        assert status == 400 and "expected JSON" in body["error"], (status, body)
    finally:
        server.send_signal(signal.SIGINT)
        try:
            code = server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
            pytest.fail("the server did not shut down within 120 s")
    assert code == 0, "".join(log[-40:])
    # Clean: every process the server started (Ray's GCS, raylet, workers, replicas) is gone.
    gone, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, f"left running: {[p.pid for p in alive]}"
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
