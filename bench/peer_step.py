"""Our BYOL training step against the same step built from lightly's BYOL modules.

Both sides use the same backbone class, heads sizes, batch, threads and
precision. Step times alternate between the two so that machine noise hits
both, and the ratio is the median of per-pair ratios. Peak resident memory
is measured in a fresh process per side. The achieved FLOP/s of our step is
reported as a fraction of an fp32 matrix multiply's FLOP/s measured in the
same run. Writes bench/results/peer_step.{json,md}.

Usage: python bench/peer_step.py [--steps 30] [--device auto|cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from steps import LightlyBYOLStep, OurStep, StepSetup
from torch.utils.flop_counter import FlopCounterMode

RESULTS = Path(__file__).parent / "results"
SIDES = ("ours", "lightly")


def _peak_memory(side: str, setup: StepSetup, steps: int) -> tuple[float, float]:
    """Run `steps` steps of `side` in a fresh process; return its peak RSS and training's share.

    Both in MiB. The share is the peak after the imports: Linux resets the
    peak (VmHWM) when "5" is written to /proc/self/clear_refs, so the second
    value is the highest resident memory while the networks are built and
    trained, whatever the imports needed before.
    """
    script = (
        "import json, resource, sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from steps import LightlyBYOLStep, OurStep, StepSetup\n"
        "if " + repr(side) + " == 'lightly':\n"
        "    import lightly.models\n"
        "def rss(field):\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith(field):\n"
        "            return int(line.split()[1]) / 1024\n"
        "peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024\n"
        "before = rss('VmRSS:')\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        f"setup = StepSetup(**json.loads({json.dumps(json.dumps(asdict(setup)))}))\n"
        f"stepper = OurStep(setup, 'byol') if {side!r} == 'ours' else LightlyBYOLStep(setup)\n"
        f"for _ in range({steps}):\n"
        "    stepper.step()\n"
        "print(max(peak, rss('VmHWM:')), rss('VmHWM:') - before)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    peak, training = completed.stdout.strip().splitlines()[-1].split()
    return float(peak), float(training)


def _matmul_flops(device: str, size: int, repeats: int = 10) -> float:
    """Median fp32 FLOP/s of a square matrix multiply, the machine's reference speed."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    times = []
    for _ in range(repeats + 2):
        started = time.perf_counter()
        torch.mm(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return 2 * size**3 / statistics.median(times[2:])


def _step_flops(stepper: OurStep) -> int:
    counter = FlopCounterMode(display=False)
    with counter:
        stepper.step()
    return counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    args = parser.parse_args()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    setup = StepSetup.for_device(device)
    if device == "cuda":
        # A true fp32 reference: TF32 would make the matmul faster than fp32.
        torch.backends.cuda.matmul.allow_tf32 = False

    ours, theirs = OurStep(setup, "byol"), LightlyBYOLStep(setup)
    for _ in range(args.warmup):
        ours.step()
        theirs.step()
    our_times, their_times, ratios = [], [], []
    for index in range(args.steps):
        if index % 2 == 0:
            our_time, their_time = ours.step(), theirs.step()
        else:
            their_time, our_time = theirs.step(), ours.step()
        our_times.append(our_time)
        their_times.append(their_time)
        ratios.append(our_time / their_time)
    quartiles = statistics.quantiles(ratios, n=4)
    print(
        f"step: ours {1000 * statistics.median(our_times):.1f} ms, lightly "
        f"{1000 * statistics.median(their_times):.1f} ms, ours / lightly "
        f"{statistics.median(ratios):.3f} (IQR {quartiles[0]:.3f}-{quartiles[2]:.3f})",
        flush=True,
    )

    measured = {side: _peak_memory(side, setup, args.warmup + 2) for side in SIDES}
    memory = {side: peak for side, (peak, _) in measured.items()}
    training = {side: share for side, (_, share) in measured.items()}
    print(
        f"peak RSS: ours {memory['ours']:.0f} MiB, lightly {memory['lightly']:.0f} MiB, "
        f"ratio {memory['ours'] / memory['lightly']:.3f}; above the imports: ours "
        f"{training['ours']:.0f} MiB, lightly {training['lightly']:.0f} MiB",
        flush=True,
    )

    flops = _step_flops(ours)
    reference = _matmul_flops(device, 8192 if device == "cuda" else 1024)
    achieved = flops / statistics.median(our_times)
    print(
        f"our step: {flops / 1e9:.2f} GFLOP, {achieved / 1e9:.1f} GFLOP/s = "
        f"{achieved / reference:.1%} of fp32 matmul ({reference / 1e9:.1f} GFLOP/s)",
        flush=True,
    )

    result = {
        "setup": {**asdict(setup), "threads": torch.get_num_threads(), **vars(args)},
        "ours_ms": 1000 * statistics.median(our_times),
        "lightly_ms": 1000 * statistics.median(their_times),
        "step_ratio": statistics.median(ratios),
        "step_ratio_iqr": [quartiles[0], quartiles[2]],
        "peak_rss_mib": memory,
        "training_rss_mib": training,
        "memory_ratio": memory["ours"] / memory["lightly"],
        "step_gflop": flops / 1e9,
        "achieved_gflops": achieved / 1e9,
        "matmul_gflops": reference / 1e9,
        "flops_fraction": achieved / reference,
        "ratios": [
            {"name": "BYOL step, ours / lightly", "value": statistics.median(ratios),
             "target": "<= 1.05"},
            {"name": "peak RSS, ours / lightly", "value": memory["ours"] / memory["lightly"],
             "target": "reported"},
            {"name": "training RSS above imports, ours / lightly",
             "value": training["ours"] / max(training["lightly"], 1e-9), "target": "reported"},
            {"name": "training FLOP/s / fp32 matmul FLOP/s", "value": achieved / reference,
             "target": "reported"},
        ],
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "peer_step.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
