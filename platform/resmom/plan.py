"""Expand a sweep spec into its concrete, validated trials.

The driver expands the whole sweep before anything starts, so a dry run
prints exactly the trials that would run, every trial's job spec is
validated up front, and a resumed sweep finds the same trials under the
same indices. Ray Tune then runs the list as given; it does no sampling.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass
from typing import Any

from resmom.specs import JobSpec, SpecError, SweepSpec, set_path, validate_job


@dataclass(frozen=True)
class Trial:
    """One job of a sweep: its index, the values it sets, and its validated spec."""

    index: int
    overrides: dict[str, Any]  # dotted job field -> value, `seed` included
    spec: JobSpec

    @property
    def key(self) -> str:
        """Stable name of the trial inside its sweep, e.g. `t003`."""
        return f"t{self.index:03d}"

    def describe(self) -> str:
        return ", ".join(f"{k}={_short(v)}" for k, v in self.overrides.items())


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    return str(value)


def _draw(dimension, rng: random.Random) -> Any:
    if dimension.choice is not None:
        return copy.deepcopy(rng.choice(dimension.choice))
    if dimension.uniform is not None:
        return rng.uniform(*dimension.uniform)
    low, high = dimension.loguniform
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _run_section(sweep: SweepSpec, base: dict[str, Any]) -> dict[str, Any]:
    """Return the `run` fields that a sweep sets in each trial: resources and tracking."""
    run: dict[str, Any] = {"experiment": sweep.experiment}
    if sweep.tracking_uri is not None:
        run["tracking_uri"] = sweep.tracking_uri
    if sweep.resources is not None:
        run["workers"] = sweep.resources.workers
        run["cpus_per_worker"] = sweep.resources.cpus_per_worker
        run["use_gpu"] = sweep.resources.gpus_per_worker > 0
        if sweep.resources.gpus_per_worker > 0:
            run["gpus_per_worker"] = sweep.resources.gpus_per_worker
    return run


def expand(sweep: SweepSpec) -> list[Trial]:
    """Return every trial: random draws x grid points x seeds, in that nesting order.

    Raises:
        SpecError: a trial's job spec is invalid; the message names the trial
            and the values it sets.
    """
    grid_keys = [k for k, d in sweep.space.items() if d.kind == "grid"]
    drawn_keys = [k for k, d in sweep.space.items() if d.kind != "grid"]
    rng = random.Random(sweep.sample_seed)
    samples = [
        {key: _draw(sweep.space[key], rng) for key in drawn_keys} for _ in range(sweep.num_samples)
    ]
    if not drawn_keys:
        # Without random fields, more samples would only repeat the grid.
        samples = samples[:1]
    points = list(itertools.product(*(sweep.space[k].grid for k in grid_keys)))

    trials = []
    for sample, point, seed in itertools.product(samples, points, sweep.seeds):
        index = len(trials)
        overrides = {**dict(zip(grid_keys, point, strict=True)), **sample, "seed": seed}
        raw = copy.deepcopy(sweep.base)
        try:
            for key, value in [*sweep.fixed.items(), *overrides.items()]:
                set_path(raw, key, value)
        except SpecError as exc:
            raise SpecError(f"sweep {sweep.name}, trial t{index:03d}: {exc}") from None
        set_path(raw, "run", _run_section(sweep, raw))
        raw["name"] = f"{sweep.name}-t{index:03d}"
        described = ", ".join(f"{k}={_short(v)}" for k, v in overrides.items())
        spec = validate_job(raw, f"sweep {sweep.name}, trial t{index:03d} ({described})")
        trials.append(Trial(index, overrides, spec))
    return trials


def fingerprint(sweep: SweepSpec) -> str:
    """A short hash of the resolved sweep spec; a rerun under the same name must match it."""
    text = json.dumps(sweep.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
