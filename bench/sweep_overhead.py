"""Wall time of a sweep through Ray Tune, Ray Train and MLflow over the same trials run plainly.

The peer runs each trial's worker loop (`resmom.train.loop.fit`) in a new
Python process, one after another, with the same checkpoints and no Ray or
MLflow. The sweep runs the same trials one at a time, each with one DDP
worker of one CPU. The ratio therefore measures what the platform adds: Ray
start-up, a Tune trial and a Ray Train worker group per trial, and MLflow
logging. Writes JSON and Markdown under bench/results/.

Usage: python bench/sweep_overhead.py [--epochs 20] [--trials 2]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from resmom.data.beton import prepare
from resmom.orchestrate.sweep import open_sweep, run_sweep
from resmom.plan import expand
from resmom.specs import SweepSpec, read_yaml_mapping

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def _sweep(epochs: int, trials: int) -> SweepSpec:
    alphas = [float(a) for a in range(trials)]
    return SweepSpec.model_validate(
        {
            "name": f"bench_sweep_{int(time.time())}",
            "base": read_yaml_mapping(ROOT / "jobs" / "digits_byol_rm.yaml"),
            "fixed": {"optim.epochs": epochs, "run.checkpoint_every": epochs},
            "space": {"rm.alpha": {"grid": alphas}},
            # FFCV sets torch to one thread per loader thread, on both sides.
            "resources": {"workers": 1, "cpus_per_worker": 1},
            "max_concurrent": 1,
        }
    )


# One trial of the peer: the worker loop in a new Python process, as a shell
# loop over a training script would run it. Each process pays its imports and
# FFCV's pipeline compilation, as each trial's Ray Train worker does.
_PLAIN_TRIAL = """
import logging, sys
from pathlib import Path
import torch
from resmom.specs import JobSpec
from resmom.train.loop import fit
logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
spec = JobSpec.model_validate_json(sys.argv[1])
train, test, checkpoints = (Path(arg) for arg in sys.argv[2:5])
fit(spec, train, test, torch.device("cpu"), checkpoint_dir=checkpoints)
"""


def _fit_in_fresh_process(spec, paths: dict[str, Path], checkpoints: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-c",
            _PLAIN_TRIAL,
            spec.model_dump_json(),
            str(paths["train"]),
            str(paths["test"]),
            str(checkpoints),
        ],
        check=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    with tempfile.TemporaryDirectory(prefix="resmom-bench-") as folder:
        data_dir = Path(folder)
        paths = prepare("digits", data_dir)
        sweep = _sweep(args.epochs, args.trials)
        trials = expand(sweep)

        started = time.perf_counter()
        for trial in trials:
            _fit_in_fresh_process(trial.spec, paths, data_dir / "plain" / trial.key)
        plain = time.perf_counter() - started
        print(f"plain worker loop, {len(trials)} trials one after another: {plain:.1f} s")

        started = time.perf_counter()
        outcome = run_sweep(open_sweep(sweep, data_dir), data_dir)
        swept = time.perf_counter() - started
        print(f"rmctl sweep (Ray Tune + Ray Train + MLflow): {swept:.1f} s")
        if set(outcome.statuses.values()) != {"FINISHED"}:
            raise SystemExit(f"sweep trials did not all finish: {outcome.statuses}")

    ratio = swept / plain
    result = {
        "trials": len(trials),
        "epochs": args.epochs,
        "plain_seconds": plain,
        "sweep_seconds": swept,
        "ratio": ratio,
        "target": 1.15,
        "ratios": [
            {
                "name": f"rmctl sweep / plain trials ({len(trials)} x {args.epochs} epochs)",
                "value": ratio,
                "target": "<= 1.15",
            }
        ],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "sweep_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "sweep_overhead.md").write_text(
        "| trials | epochs | plain loop (s) | sweep (s) | sweep / plain | target |\n"
        "| --- | --- | --- | --- | --- | --- |\n"
        f"| {len(trials)} | {args.epochs} | {plain:.1f} | {swept:.1f} | {ratio:.3f} | <= 1.15 |\n"
    )
    print(f"sweep / plain wall time: {ratio:.3f} (target <= 1.15)")


if __name__ == "__main__":
    main()
