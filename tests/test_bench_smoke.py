"""Every benchmark in bench/ runs in its --smoke mode and prints the figures it promises.

A smoke run is the benchmark's own code path on a tiny input: its figures mean nothing, so they are not
judged here, only read. A benchmark that no longer runs on the engine as it is (a changed API, a moved
module, a storage layout it does not know) fails this module instead of the next person who needs its
numbers. Each runs as a subprocess from the repository root, as a person would start it, writing its
JSON under the test's temp dir.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIGURE = re.compile(r"^([a-z0-9_]+): (\S+)$")
# bench/vision.py's default 'before' code: the four vision steps it compares evidence.v1 with exist only
# there, so a checkout without that history (a shallow clone) skips it.
VISION_BASELINE = "8d1bc67"


@dataclass(frozen=True)
class Bench:
    script: str
    figures: tuple[str, ...]  # the ``name: X.XX`` lines it promises, the last one last
    shared: tuple[str, ...] = ()  # paths under ../shared it reads
    marks: tuple = ()


BENCHES = [
    Bench("parse.py", ("parse_speedup_vs_stock_sng", "stage_vs_pipe_ceiling"), ("data/captions",),
          (pytest.mark.ray, pytest.mark.slow)),
    Bench("scale.py", ("driver_rss_growth_4x", "worker_rss_growth_4x", "time_ratio_4x"), (),
          (pytest.mark.ray, pytest.mark.slow)),
    Bench("train.py", ("driver_peak_rss_4x_rows", "train_scaling_2_workers"), (),
          (pytest.mark.ray, pytest.mark.slow)),
    Bench("vision.py", ("vision_steps_speedup",), ("data/coco20", "ref/ram"), (pytest.mark.slow,)),
    Bench("readers.py", ("whole_load_vs_plan_peak",), ("data/captions",)),
    Bench("tagging.py", ("tagging_speedup_vs_per_image",), ("data/coco20",)),
    Bench("crops.py", ("crops_inference_form_speedup", "crops_native_speedup", "view_cost_vs_native_crop")),
    Bench("cnn_train.py", ("cnn_train_channels_last_speedup", "cnn_train_cpu_bf16_speedup")),
    Bench("engine_ablation.py", ("arm_a_parse_truth_map", "arm_b_generated_truth_map", "arm_c_cleaned_truth_map",
                                 "arm_c_prime_paper_truth_map", "arm_d_truth_truth_map", "engine_gap_closed"), (),
          (pytest.mark.ray, pytest.mark.slow)),
]


def run_smoke(script: str, args: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    # One intra-op thread: on a busy machine two OpenMP threads that wait on each other stall for long
    # stretches, and a smoke run's speed is not what it checks.
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(REPO / "bench" / script), "--smoke", *args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, f"bench/{script} --smoke failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


def figures(stdout: str) -> dict[str, str]:
    return {m.group(1): m.group(2) for line in stdout.splitlines() if (m := FIGURE.match(line.strip()))}


def needs_shared(request, paths: tuple[str, ...]) -> None:
    if not paths:
        return
    root = request.getfixturevalue("shared")  # skips without ../shared
    missing = [p for p in paths if not (root / p).exists()]
    if missing:
        pytest.skip(f"needs {', '.join(missing)} under {root}")


def extra_args(bench: Bench, tmp_path: Path) -> list[str]:
    if bench.script == "readers.py":  # its generated json goes to --dir
        return ["--dir", str(tmp_path)]
    if bench.script == "engine_ablation.py":  # one seed's run directory
        return ["--seeds", "0", "--runs", str(tmp_path / "runs")]
    if bench.script == "vision.py":
        known = subprocess.run(["git", "-C", str(REPO), "cat-file", "-e", f"{VISION_BASELINE}^{{commit}}"],
                               capture_output=True).returncode == 0
        if not known:
            pytest.skip(f"bench/vision.py compares with {VISION_BASELINE}'s four vision steps; this clone lacks "
                        f"that commit (shallow?)")
        return []
    return []


@pytest.mark.parametrize("bench", [pytest.param(b, id=b.script, marks=b.marks) for b in BENCHES])
def test_benchmark_smoke_prints_its_figures(bench: Bench, request, tmp_path):
    needs_shared(request, bench.shared)
    res = run_smoke(bench.script, ["--out", str(tmp_path / "out.json"), *extra_args(bench, tmp_path)])
    got = figures(res.stdout)
    missing = [f for f in bench.figures if f not in got]
    assert not missing, f"bench/{bench.script} printed no {missing}; its output ended:\n{res.stdout[-1500:]}"
    for name in bench.figures:
        assert math.isfinite(float(got[name])), f"{name}: {got[name]!r} is not a finite number"
    last = res.stdout.strip().splitlines()[-1]
    assert last.startswith(f"{bench.figures[-1]}: "), f"bench/{bench.script}'s last line is {last!r}"
    assert json.loads((tmp_path / "out.json").read_text())  # the results it keeps, beside the printed lines


GPU_FIGURES = ("model_img_per_s", "decode_img_per_s")


def test_gpu_check_smoke_runs_its_sections_on_the_cpu(shared, tmp_path):
    """bench/gpu.py needs CUDA for its figures; --smoke runs the same sections (RAM inference at both
    precisions with every decode-worker count, Grounding DINO, the training step) with tiny models on
    the CPU, so the script is checked on a machine without a GPU."""
    if not (shared / "data/coco20/images").is_dir():
        pytest.skip(f"needs data/coco20/images under {shared}")
    res = run_smoke("gpu.py", ["--out", str(tmp_path / "gpu.json")])
    line = json.loads(res.stdout.strip().splitlines()[-1])
    assert json.loads((tmp_path / "gpu.json").read_text()) == line
    for precision in ("bf16", "fp32"):
        ram = line[f"ram_{precision}"]
        assert "error" not in ram, ram
        for key in GPU_FIGURES:
            assert math.isfinite(ram[key]), (precision, key, ram[key])
        workers = [k for k in ram if k.startswith("decode_workers_")]
        assert workers and all(math.isfinite(ram[k]["with_decode_img_per_s"]) for k in workers)
        gd = line[f"grounding_dino_{precision}"]
        assert "error" not in gd and gd["pairs"] > 0 and math.isfinite(gd["pairs_per_s"]), gd
    train = line["train_bf16"]
    assert "error" not in train and math.isfinite(train["img_per_s"]) and math.isfinite(train["loss_last"]), train
