"""Step time of each method with the residual-momentum term over the same step without it.

Both variants run the same forward passes. The RM term only adds a distance
on outputs that the SSL loss already computed, so the ratio should be near 1.
Timings alternate between the variants so that machine noise hits both, and
the ratio is the median of per-pair ratios. The RM term's own forward and
backward are also timed alone. Prints one row per method and writes JSON and
Markdown under bench/results/.

Usage: python bench/rm_overhead.py [--steps 60] [--warmup 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from steps import OurStep, StepSetup

from resmom.ssl.losses import residual_distance

RESULTS = Path(__file__).parent / "results"


def _term_seconds(stepper: OurStep, repeats: int = 200) -> float:
    """Median time of the residual term's own forward and backward on output-sized tensors.

    This is the only work RM adds to a step (the baseline computes the same
    outputs), measured without the step's noise around it.
    """
    spec, setup = stepper.spec, stepper.setup
    shape = (2, setup.batch, spec.method.projection_dim)
    student = torch.randn(shape, device=setup.device, requires_grad=True)
    teacher = torch.randn(shape, device=setup.device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        term = residual_distance(student, teacher, spec.rm.distance, spec.rm.kd_temperature)
        term.backward()
        if setup.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        student.grad = None
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    args = parser.parse_args()
    setup = StepSetup.for_device("cuda" if torch.cuda.is_available() else "cpu")

    rows = []
    for method in ("byol", "mocov3", "mocov2"):
        baseline = OurStep(setup, method, alpha=0.0)
        residual = OurStep(setup, method, alpha=1.0)
        for _ in range(args.warmup):
            baseline.step()
            residual.step()
        base_times, rm_times, pair_ratios = [], [], []
        for index in range(args.steps):
            # Alternate which variant goes first so slow drift hits both; the
            # ratio within each pair cancels what the two steps share.
            if index % 2 == 0:
                base_time, rm_time = baseline.step(), residual.step()
            else:
                rm_time, base_time = residual.step(), baseline.step()
            base_times.append(base_time)
            rm_times.append(rm_time)
            pair_ratios.append(rm_time / base_time)
        base_median = statistics.median(base_times)
        term_ms = 1000 * _term_seconds(residual)
        quartiles = statistics.quantiles(pair_ratios, n=4)
        rows.append(
            {
                "method": method,
                "baseline_ms": 1000 * base_median,
                "rm_ms": 1000 * statistics.median(rm_times),
                "ratio": statistics.median(pair_ratios),
                "ratio_q1": quartiles[0],
                "ratio_q3": quartiles[2],
                "term_ms": term_ms,
                "term_fraction": term_ms / (1000 * base_median),
            }
        )
        row = rows[-1]
        print(f"{method:7s} baseline {row['baseline_ms']:8.1f} ms  rm {row['rm_ms']:8.1f} ms  "
              f"paired ratio {row['ratio']:.3f} (IQR {row['ratio_q1']:.3f}-{row['ratio_q3']:.3f})  "
              f"term alone {term_ms:.2f} ms = {row['term_fraction']:.2%} of a step",
              flush=True)  # fmt: skip

    described = {**asdict(setup), "threads": torch.get_num_threads(), **vars(args)}
    ratios = [
        {"name": f"{row['method']} + RM / {row['method']} step", "value": row["ratio"],
         "target": "<= 1.03"}
        for row in rows
    ]  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rm_overhead.json").write_text(
        json.dumps({"setup": described, "rows": rows, "ratios": ratios}, indent=2) + "\n"
    )
    lines = [
        "| method | baseline step (ms, median) | RM step (ms, median) | RM / baseline "
        "(median of paired ratios, IQR) | RM term alone, forward + backward (share of a step) |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['method']} | {r['baseline_ms']:.1f} | {r['rm_ms']:.1f} | {r['ratio']:.3f} "
        f"({r['ratio_q1']:.3f}-{r['ratio_q3']:.3f}) | {r['term_ms']:.2f} ms "
        f"({r['term_fraction']:.2%}) |"
        for r in rows
    ]
    (RESULTS / "rm_overhead.md").write_text(
        f"Setup: {json.dumps(described)}\n\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
