"""The cluster path: a Ray head started with ``ray start --head`` on this machine, a workflow joined to it
through ``ray.address`` = ``127.0.0.1:PORT`` (Ray maps a loopback address to this node's own IP, where the
head listens), then the head stopped. The run happens in a subprocess, as a submitted job would."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.store import StepDir

from tests.conftest import SMALL_WORLD, write_config

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# Ray 2.60's `ray start` clusters ask for an auth token: head and driver share one through the environment.
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex()}


@pytest.fixture
def ray_head(tmp_path):
    port = _free_port()
    temp = Path(f"/tmp/ray-head-{os.getpid()}")  # short: Ray's socket paths have a length limit
    proc = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True, text=True,
        env={**os.environ, **AUTH})
    address = f"127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:  # wait until the GCS answers
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if proc.poll() is not None:
            pytest.fail(f"ray start --head exited: {proc.stderr.read()[-2000:]}")
        time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail("Ray head did not come up within 90 s")
    yield address
    os.killpg(proc.pid, signal.SIGTERM)  # --block: SIGTERM makes `ray start` stop what it started
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_workflow_joins_a_running_head_through_address(ray_head, tmp_path):
    if not RAY.exists():
        pytest.skip(f"no ray executable beside {sys.executable}")
    cfg = write_config(tmp_path / "cluster.yaml", SMALL_WORLD.format(images=24, shard_rows=8, ray="true"))
    out = tmp_path / "run"
    env = {**os.environ, "RAY_ADDRESS": "", **AUTH}
    res = subprocess.run([sys.executable, "-m", "pipeline", "run", str(cfg), "--out", str(out),
                          "--set", f"ray.address={ray_head}"], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads((out / "export" / "_manifest.json").read_text())
    assert m["rows_out"] == 24 and m["shards"] == 3
    assert StepDir(out / "export").read(["image_id"]).num_rows == 24
    assert not (out / "_ray").exists()  # joined the head: no local Ray was started under the run
