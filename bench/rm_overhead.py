"""Step time of each method with the residual-momentum term over the same step without it.

Both variants run the same forward passes. The RM term only adds a distance
on outputs that the SSL loss already computed, so the ratio should be near 1.
Timings alternate between the variants so that machine noise hits both, and
the table reports medians. Prints one row per method and writes JSON and
Markdown under bench/results/.

Usage: python bench/rm_overhead.py [--steps 60] [--batch 64] [--width 16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from resmom.specs import validate_job
from resmom.ssl.ema import ema_update
from resmom.ssl.losses import residual_distance
from resmom.ssl.step import build, forward_step
from resmom.train.optim import build_optimizer

RESULTS = Path(__file__).parent / "results"


def _spec(method: str, alpha: float, width: int, batch: int):
    fields: dict = {"name": method, "projector_hidden_dim": 512, "projection_dim": 128}
    fields["queue_size" if method == "mocov2" else "predictor_hidden_dim"] = (
        4 * batch if method == "mocov2" else 512
    )
    return validate_job(
        {
            "name": f"bench-{method}",
            "model": {"width": width},
            "method": fields,
            "rm": {"alpha": alpha},
            "optim": {"batch_size": batch},
            "run": {"workers": 1},
        }
    )


class _Stepper:
    """One method variant with its own networks and optimizer, stepping on fixed views."""

    def __init__(
        self, method: str, alpha: float, width: int, batch: int, device: torch.device
    ) -> None:
        torch.manual_seed(0)
        self.spec = _spec(method, alpha, width, batch)
        self.alpha = alpha
        self.networks = build(self.spec)
        self.networks.student.to(device)
        self.networks.teacher.to(device)
        if self.networks.queue is not None:
            self.networks.queue.to(device)
        self.optimizer = build_optimizer(self.networks.student, self.spec.optim)
        self.views = torch.randn(2, batch, 3, 32, 32, device=device).unbind(0)
        self.device = device

    def step(self) -> float:
        started = time.perf_counter()
        networks = self.networks
        out = forward_step(
            networks.student, networks.teacher, networks.queue, *self.views, self.spec, self.alpha
        )
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        self.optimizer.step()
        ema_update(networks.teacher, networks.student.encoder, 0.99)
        if networks.queue is not None:
            networks.queue.push(out.teacher_keys.flatten(0, 1))
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - started


def _term_seconds(stepper: _Stepper, batch: int, device: torch.device, repeats: int = 200) -> float:
    """Median time of the residual term's own forward and backward on output-sized tensors.

    This is the only work RM adds to a step (the baseline computes the same
    outputs), measured without the step's noise around it.
    """
    spec = stepper.spec
    dim = spec.method.projection_dim
    student = torch.randn(2, batch, dim, device=device, requires_grad=True)
    teacher = torch.randn(2, batch, dim, device=device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        term = residual_distance(student, teacher, spec.rm.distance, spec.rm.kd_temperature)
        term.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
        student.grad = None
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=16, help="ResNet-18 first-stage channels")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    rows = []
    for method in ("byol", "mocov3", "mocov2"):
        baseline = _Stepper(method, 0.0, args.width, args.batch, device)
        residual = _Stepper(method, 1.0, args.width, args.batch, device)
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
        term_ms = 1000 * _term_seconds(residual, args.batch, device)
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

    setup = {"device": str(device), "threads": torch.get_num_threads(), **vars(args)}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "rm_overhead.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2))
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
        f"Setup: {json.dumps(setup)}\n\n" + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
