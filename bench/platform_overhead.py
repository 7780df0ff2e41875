"""Wall time of `rmctl run` (Ray Train and MLflow) over the worker loop called in this process.

Both sides train the same job: the digits BYOL+RM job with one worker, so
that they do the same computation. The peer calls `resmom.train.loop.fit`
directly, with the same checkpoints and no Ray or MLflow. The platform side
calls what `rmctl run` calls, so it pays Ray's start-up, a Ray Train worker
group in new processes (which compile FFCV's pipeline again) and MLflow
logging. Writes bench/results/platform_overhead.{json,md}.

Usage: python bench/platform_overhead.py [--epochs 15]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from resmom.data.beton import prepare
from resmom.orchestrate import run_job
from resmom.specs import load_job
from resmom.train.loop import fit

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
TARGET = 1.10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15, help="about 10 s each on 2 cores")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    spec = load_job(
        ROOT / "jobs" / "digits_byol_rm.yaml",
        [
            f"optim.epochs={args.epochs}",
            f"run.checkpoint_every={args.epochs}",
            "run.workers=1",
            "run.cpus_per_worker=1",
            "name=bench_platform",
        ],
    )

    with tempfile.TemporaryDirectory(prefix="resmom-bench-") as folder:
        data_dir = Path(folder)
        paths = prepare("digits", data_dir)

        started = time.perf_counter()
        fit(
            spec,
            paths["train"],
            paths["test"],
            torch.device("cpu"),
            checkpoint_dir=data_dir / "plain",
        )
        plain = time.perf_counter() - started
        print(f"worker loop in this process: {plain:.1f} s", flush=True)

        started = time.perf_counter()
        run_job(spec, data_dir)
        platform = time.perf_counter() - started
        print(f"rmctl run (Ray Train + MLflow): {platform:.1f} s", flush=True)

    ratio = platform / plain
    print(f"rmctl run / worker loop wall time: {ratio:.3f} (target <= {TARGET})")
    result = {
        "epochs": args.epochs,
        "plain_seconds": plain,
        "platform_seconds": platform,
        "ratios": [
            {
                "name": f"rmctl run / worker loop in one process ({args.epochs} epochs)",
                "value": ratio,
                "target": f"<= {TARGET}",
            }
        ],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "platform_overhead.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
