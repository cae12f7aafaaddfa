"""The cluster path on one machine: a Ray head (``ray start --head``) and a second node (``ray start --address``
with its own CPUs and temp dir) form a two-node cluster; a workflow joins it through ``ray.address`` =
``127.0.0.1:PORT`` (Ray maps a loopback address to this node's own IP, where the head listens) and spreads a
step's shards over both nodes. Then a second node that stalls in the parse step is killed in the middle of it:
the run finishes (or a second run resumes it) with output byte-identical to the undisturbed run's.

Every node is a ``ray start --block`` process in its own session with its own temp dir, which every process of
that node names on its command line: the test stops (or kills) its nodes by that and by their process groups,
never with ``ray stop`` (which stops every Ray on the machine). The runs happen in subprocesses, as a submitted
job's driver would."""
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.store import StepDir

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")
TAG = secrets.token_hex(4)  # names this module's nodes' temp dirs, and so their processes

# Ray 2.60's `ray start` clusters ask for an auth token: nodes and driver share one through the environment.
AUTH = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": os.urandom(16).hex()}
# the head declares a killed node dead after 3 missed 1 s health checks (Ray's default takes ~15-30 s)
FAST_HEALTH = {"RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "1000",
               "RAY_health_check_timeout_ms": "1000", "RAY_health_check_failure_threshold": "3"}
# on SIGTERM a node drains first and waits to go idle, which Ray Data's long-lived actors never let it: 0 stops
# it at once (the default's wait ends only on the GCS's own shutdown timeout)
NO_DRAIN = {"RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
# three steps: a task step (input), an actor step (parse, where a node is lost), and a reduce that reads its rows
CONFIG = """
steps: {input: source.scene_world.v1, parse: parse.sng.v1, vocab: vocab.wordnet.v1}
seed: 3
ray: {progress: false}
input: {images: 24, shard_rows: 4, size: 64}
vocab: {min_count: 1}
"""
# the run's bookkeeping, which says when and where things ran; everything else a run writes is its output
BOOKKEEPING = {"_manifest.json", "_plan.json", "_run.json", "run.log", "_error.json"}

pytestmark = [pytest.mark.ray, pytest.mark.slow,
              pytest.mark.skipif(not RAY.exists(), reason=f"no ray executable beside {sys.executable}")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes(pattern: str) -> list[str]:
    res = subprocess.run(["pgrep", "-af", pattern], capture_output=True, text=True)
    return [line for line in res.stdout.splitlines() if "pgrep" not in line]


class Node:
    """One ``ray start --block`` node this test started (``--block``: SIGTERM makes it stop what it started)."""

    def __init__(self, name: str, args: list[str], env: dict):
        self.temp = f"/tmp/rt-{TAG}-{name}"  # short: Ray's socket paths have a length limit
        self.proc = subprocess.Popen([str(RAY), "start", "--block", "--disable-usage-stats", f"--temp-dir={self.temp}",
                                      *args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True,
                                     env={**os.environ, **AUTH, **FAST_HEALTH, **NO_DRAIN, **env})

    def kill(self) -> None:
        """As a node dies: every process of it SIGKILLed at once, nothing shut down in order."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        subprocess.run(["pkill", "-9", "-f", self.temp], check=False)
        self.proc.wait()

    def stop(self) -> None:
        """SIGTERM to ``ray start --block`` alone: it stops what it started, in order; then no process of the
        node may be left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        deadline = time.time() + 30
        while _processes(self.temp) and time.time() < deadline:
            time.sleep(0.5)
        left = _processes(self.temp)
        if left:
            subprocess.run(["pkill", "-9", "-f", self.temp], check=False)
            pytest.fail(f"node {self.temp} left {len(left)} process(es) behind after stopping: {left[:3]}")


WAIT_FOR_NODES = """
import json, sys, time
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.time() + 300  # a bound on waiting: a node joins in seconds, minutes on a busy machine
while True:
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) >= int(sys.argv[2]) or time.time() > deadline:
        break
    time.sleep(0.5)
print(json.dumps({n["NodeID"]: "node:__internal_head__" in n["Resources"] for n in nodes}))
"""


def _alive_nodes(address: str, want: int) -> dict[str, bool]:
    """The cluster's alive nodes (node id -> is the head), once ``want`` of them are up."""
    res = subprocess.run([sys.executable, "-c", WAIT_FOR_NODES, address, str(want)], capture_output=True, text=True,
                         env={**os.environ, **AUTH}, timeout=420)
    assert res.returncode == 0, res.stderr[-2000:]
    nodes = json.loads(res.stdout.splitlines()[-1])
    assert len(nodes) == want, f"expected {want} alive nodes, got {nodes}"
    return nodes


def _start_second_node(address: str, env: dict | None = None, name: str = "n2") -> tuple[Node, str]:
    node = Node(name, [f"--address={address}", "--num-cpus=2"], env or {})
    nodes = _alive_nodes(address, 2)
    return node, next(i for i, head in nodes.items() if not head)


def _run(cfg: Path, out: Path, address: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(cfg), "--out", str(out),
                             "--set", f"ray.address={address}"], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "RAY_ADDRESS": "", **AUTH})


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=900)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def head():
    port = _free_port()
    node = Node("hd", ["--head", f"--port={port}", "--num-cpus=2", "--include-dashboard=false"], {})
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:  # wait until the GCS answers
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if node.proc.poll() is not None:
                pytest.fail(f"ray start --head exited: {node.proc.stderr.read()[-2000:]}")
            time.sleep(0.5)
        else:
            pytest.fail("Ray head did not come up within 90 s")
        head_id = next(iter(_alive_nodes(address, 1)))
        yield address, head_id
    finally:
        node.stop()


@pytest.fixture(scope="module")
def undisturbed(head, tmp_path_factory):
    """A run on head + second node, both left alone; the second node is stopped after it."""
    address, head_id = head
    tmp = tmp_path_factory.mktemp("two_nodes")
    cfg = tmp / "cluster.yaml"
    cfg.write_text(CONFIG)
    node, node_id = _start_second_node(address)
    try:
        code, out, err = _finish(_run(cfg, tmp / "run", address))
    finally:
        node.stop()
    assert code == 0, err[-3000:]
    return {"cfg": cfg, "out": tmp / "run", "head": head_id, "node": node_id, "summary": out}


def _shard_nodes(run: Path, step: str) -> dict[int, str]:
    return {i: st["node_id"] for i, st in StepDir(run / step).done_shards(
        json.loads((run / step / "_manifest.json").read_text())["fingerprint"]).items()}


def _outputs(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and p.name not in BOOKKEEPING and "_stats" not in p.parts}


def test_a_run_spreads_a_steps_shards_over_both_nodes(undisturbed):
    run, head_id, node_id = undisturbed["out"], undisturbed["head"], undisturbed["node"]
    parse = json.loads((run / "parse" / "_manifest.json").read_text())
    # parse loads spaCy once per actor: a pool of what the cluster offers, 2 CPUs on each node
    assert parse["pool"] == {"kind": "actors", "size": 4, "from": "cluster: 4 CPU / 1 per worker"}
    placed = _shard_nodes(run, "parse")
    assert sorted(placed) == list(range(6)) and set(placed.values()) == {head_id, node_id}
    assert parse["workers"]["used"] == 4
    assert {n: w["shards"] for n, w in parse["workers"]["nodes"].items()} == {
        n: list(placed.values()).count(n) for n in (head_id, node_id)}
    for step in ("input", "vocab"):  # task steps: every shard ran on a node of this cluster
        assert set(_shard_nodes(run, step).values()) <= {head_id, node_id}
    assert "4 on 2 nodes" in next(line for line in undisturbed["summary"].splitlines() if line.startswith("parse "))
    assert json.loads((run / "vocab" / "_manifest.json").read_text())["rows_in"] == 24
    assert not (run / "_ray").exists()  # joined the cluster: no local Ray was started under the run


def test_losing_a_node_mid_step_leaves_the_output_as_if_nothing_happened(head, undisturbed, tmp_path):
    address, head_id = head
    markers = tmp_path / "stalled"
    markers.mkdir()
    # this node's workers stop in each parse shard they get, until the node is killed
    node, node_id = _start_second_node(address, {"PIPELINE_FAULT": f"stall:parse:{markers}"}, name="n3")
    out = tmp_path / "run"
    proc = _run(undisturbed["cfg"], out, address)
    try:
        deadline = time.time() + 600
        while not list(markers.iterdir()) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        stalled = sorted(int(p.name.split("-")[1]) for p in markers.iterdir())
        assert stalled, f"no parse shard reached the second node (driver exit code {proc.poll()})"
        node.kill()
        code, _, err = _finish(proc)
    finally:
        node.stop()
        if proc.poll() is None:  # a failed check above: the driver goes too
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    outcome = "finished" if code == 0 else "resumed"
    if code != 0:  # the run lost the step: the same command resumes it on what is left of the cluster
        assert (out / "_error.json").exists(), err[-3000:]
        code, _, err = _finish(_run(undisturbed["cfg"], out, address))
        assert code == 0, err[-3000:]
    print(f"\nnode lost in parse holding shard(s) {stalled}: the run {outcome}")
    placed = _shard_nodes(out, "parse")
    assert all(placed[i] == head_id for i in stalled)  # redone on the node that was left
    ref, got = _outputs(undisturbed["out"]), _outputs(out)
    assert sorted(got) == sorted(ref)
    assert [k for k in ref if ref[k] != got[k]] == []
    for step in ("input", "parse", "vocab"):
        m_ref, m_got = (json.loads((r / step / "_manifest.json").read_text()) for r in (undisturbed["out"], out))
        assert (m_got["fingerprint"], m_got["rows_out"]) == (m_ref["fingerprint"], m_ref["rows_out"])
