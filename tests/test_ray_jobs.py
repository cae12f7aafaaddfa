"""The README's cluster command, as a new user runs it: a head started with ``ray start --head`` (its
dashboard on loopback, token authentication as Ray 2.60 clusters want), then ``ray job submit
--working-dir . -- <project python> -m pipeline run ... --set ray.address=auto`` from the repository,
then the head stopped. Everything the job writes goes to an absolute temp dir outside the working dir:
``--working-dir`` zips the repository (honouring .gitignore) and nothing may write into it meanwhile."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.store import StepDir

from tests.conftest import SMALL_WORLD, write_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")  # the project environment's own CLI (ray[default])
UP_S, JOB_S, STOP_S = 120, 600, 90  # bounds on waiting, not expectations of speed


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _session_pids(sid: int) -> list[int]:
    """Live (non-zombie) processes of one session: everything ``ray start`` started, actors included
    (they get their own process groups, but stay in the session)."""
    pids = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if os.getsid(int(d.name)) == sid and (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                pids.append(int(d.name))
        except (OSError, IndexError):
            continue  # gone meanwhile
    return pids


def _stop_head(proc: subprocess.Popen) -> list[int]:
    """SIGTERM to ``ray start --block`` alone: it stops what it started, in order (signalling the whole
    group would kill the GCS first, under the raylet's feet, and leave actors behind). ``ray stop`` is
    not used: it stops every Ray on the machine, not just this head. Returns the pids still alive after
    the graceful stop, then kills those, by pid."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    deadline = time.monotonic() + STOP_S
    while (left := _session_pids(proc.pid)) and time.monotonic() < deadline:
        time.sleep(0.5)  # workers exit once their raylet is gone
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return left


def _ray(args: list[str], env: dict, timeout: float, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(RAY), *args], env=env, capture_output=True, text=True, timeout=timeout, **kw)


def test_readme_job_submit_runs_a_workflow_on_a_started_head(tmp_path):
    if not RAY.exists():
        pytest.skip(f"no ray executable beside {sys.executable}")
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())  # head and client share it
    # On SIGTERM the head drains first and waits for its node to go idle, which Ray Data's long-lived
    # actors (stats, autoscaling) never let it: 0 means tear down at once (no Serve traffic to spare here).
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"
    gcs, dash, client, agent_http, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr = _free_ports(9)
    temp = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    url = f"http://127.0.0.1:{dash}"
    log = open(tmp_path / "head.log", "w")
    proc = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent_http}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
         f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}", "--num-cpus=2",
         f"--temp-dir={temp}", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    left: list[int] = []
    try:
        deadline = time.monotonic() + UP_S
        while _ray(["job", "list", "--address", url], env, UP_S).returncode != 0:  # the dashboard answers
            assert proc.poll() is None, f"ray start --head exited: {(tmp_path / 'head.log').read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"no dashboard at {url} within {UP_S} s"
            time.sleep(1)
        cfg = write_config(tmp_path / "job.yaml", SMALL_WORLD.format(images=24, shard_rows=8, ray="true"))
        out = tmp_path / "run"
        submit = ["job", "submit", "--address", url, "--working-dir", ".", "--", sys.executable, "-m",
                  "pipeline", "run", str(cfg), "--set", "ray.address=auto", "--out", str(out)]
        # the dashboard can answer before the node's job agent has registered (slow on a busy machine):
        # Ray refuses with "No available agent ... try again later", before any job exists
        deadline = time.monotonic() + UP_S
        while "No available agent to submit job" in (res := _ray(submit, env, JOB_S, cwd=REPO)).stderr:
            assert time.monotonic() < deadline, f"no job agent at {url} within {UP_S} s"
            time.sleep(2)
        assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
        assert "succeeded" in res.stdout + res.stderr
        m = json.loads((out / "export" / "_manifest.json").read_text())
        assert (m["rows_in"], m["rows_out"], m["shards"], m["json_rows"]) == (24, 24, 3, 24)
        assert StepDir(out / "export").read(["image_id"]).num_rows == 24
        jsonl = sorted((out / "export" / "jsonl").glob("part-*.jsonl"))
        lines = [ln for f in jsonl for ln in f.read_text().splitlines()]
        assert len(lines) == 24 and json.loads((out / "export" / "ram_train.json").read_text()) == [
            json.loads(ln) for ln in lines]
        assert not (out / "_ray").exists()  # the job joined the head: no local Ray was started under the run
        listed = _ray(["job", "list", "--address", url], env, UP_S)
        assert "SUCCEEDED" in listed.stdout + listed.stderr
    finally:
        left = _stop_head(proc)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
    assert proc.returncode is not None and not left, f"processes left after the head stopped: {left}"
