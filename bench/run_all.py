"""Run every benchmark, then print one table of ratios against their peers.

Each benchmark runs in its own process (so one's threads and caches do not
leak into the next) and writes bench/results/NAME.json with a `ratios`
list. This script collects those lists into bench/results/summary.{json,md}.

Usage: python bench/run_all.py [--only NAME ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).parent
RESULTS = BENCH / "results"
# name -> (script, arguments, arguments with --quick)
BENCHMARKS = {
    "peer_step": ("peer_step.py", [], ["--steps", "10"]),
    "rm_overhead": ("rm_overhead.py", [], ["--steps", "20"]),
    "data_pipeline": ("data_pipeline.py", [], []),
    "platform_overhead": ("platform_overhead.py", [], ["--epochs", "2"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS), default=None)
    parser.add_argument("--quick", action="store_true", help="fewer steps and epochs")
    args = parser.parse_args()
    names = args.only or list(BENCHMARKS)

    seconds = {}
    for name in names:
        script, full, quick = BENCHMARKS[name]
        print(f"== {name} ==", flush=True)
        started = time.perf_counter()
        subprocess.run(
            [sys.executable, str(BENCH / script), *(quick if args.quick else full)], check=True
        )
        seconds[name] = time.perf_counter() - started

    rows = []
    for name in names:
        path = RESULTS / f"{name}.json"
        if path.is_file():
            for ratio in json.loads(path.read_text()).get("ratios", []):
                rows.append({"benchmark": name, **ratio})
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}" + (
        f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    )
    width = max(len(row["name"]) for row in rows) if rows else 10
    print(f"\nRatios against peers measured in the same run ({machine}):")
    for row in rows:
        print(f"  {row['name']:<{width}}  {row['value']:8.3f}  target {row['target']}")
    RESULTS.mkdir(exist_ok=True)
    summary = {"machine": machine, "seconds": seconds, "rows": rows}
    (RESULTS / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"Machine: {machine}. Command: `make bench` (`python bench/run_all.py`).",
        "",
        "| benchmark | comparison | ratio | target |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {row['benchmark']} | {row['name']} | {row['value']:.3f} | {row['target']} |"
        for row in rows
    ]
    (RESULTS / "summary.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
