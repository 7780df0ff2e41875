"""Ray Tune adapter for sweeps: one Tune trial per planned trial, each fitting a TorchTrainer.

MLflow is the record of what ran, and Tune's saved state is how an
interrupted sweep continues. Each trial looks up its own child run before
training. Tune may run a trial again when its state was saved before the
trial finished. Such a trial then neither trains twice nor opens a second
run: a finished one reports its logged metrics and returns, and an
unfinished one continues from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from resmom import tracking
from resmom.data.beton import prepare, spec_options
from resmom.orchestrate import failure_tags, fit_job, has_checkpoint, init_ray
from resmom.paths import write_json_atomic
from resmom.plan import Trial, expand, fingerprint
from resmom.specs import JobSpec, SweepSpec

log = logging.getLogger(__name__)

RECORD_NAME = "sweep.json"
TUNE_FOLDER = "tune"
# Bytes of Ray's memory resource each trial's own process reserves.
_TRIAL_MEMORY = 64 * 2**20


class SweepError(RuntimeError):
    """A sweep that cannot start or continue; the message names the remedy."""


@dataclass(frozen=True)
class SweepRecord:
    """Sweep metadata that `--resume`, `rmctl ls` and `rmctl report` read to find a sweep."""

    name: str
    fingerprint: str
    spec: dict[str, Any]
    parent_run_id: str
    tracking_uri: str
    folder: str
    created: float

    def save(self) -> None:
        write_json_atomic(Path(self.folder) / RECORD_NAME, asdict(self))

    @property
    def sweep(self) -> SweepSpec:
        return SweepSpec.model_validate(self.spec)


def sweeps_root(data_dir: Path, storage_path: str | None = None) -> Path:
    return Path(storage_path).expanduser().resolve() if storage_path else data_dir / "sweeps"


def load_record(data_dir: Path, name: str) -> SweepRecord:
    """Find sweep `name` in the data folder.

    Raises:
        SweepError: no such sweep; the message lists the known ones.
    """
    path = sweeps_root(data_dir) / name / RECORD_NAME
    if not path.is_file():
        known = ", ".join(record.name for record in list_records(data_dir)) or "none"
        raise SweepError(f"no sweep named {name!r} in {sweeps_root(data_dir)}; known: {known}")
    return SweepRecord(**json.loads(path.read_text()))


def list_records(data_dir: Path) -> list[SweepRecord]:
    root = sweeps_root(data_dir)
    records = [
        SweepRecord(**json.loads(path.read_text()))
        for path in sorted(root.glob(f"*/{RECORD_NAME}"))
    ]
    return sorted(records, key=lambda record: record.created)


def _trial_payload(trial: Trial) -> dict[str, Any]:
    return {
        "index": trial.index,
        "key": trial.key,
        "overrides": trial.overrides,
        "spec": trial.spec.model_dump(mode="json"),
    }


def find_trial_run(tracking_uri: str, parent_run_id: str, key: str):
    """Return the child run of trial `key` under the sweep's parent run, or None."""
    matches = [
        run
        for run in tracking.child_runs(tracking_uri, parent_run_id)
        if run.data.tags.get("trial") == key
    ]
    return matches[-1] if matches else None


def _run_trial(config: dict[str, Any]) -> None:
    """Tune function trainable: open or find the trial's MLflow run, then fit its trainer."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    context, payload = config["sweep"], config["trial"]
    spec = JobSpec.model_validate(payload["spec"])
    tracking_uri, parent = context["tracking_uri"], context["parent_run_id"]
    data_dir = Path(context["data_dir"])

    existing = find_trial_run(tracking_uri, parent, payload["key"])
    resume = False
    if existing is not None and existing.info.status == "FINISHED":
        tune.report({"epoch": spec.optim.epochs, **existing.data.metrics})
        return
    if existing is not None and has_checkpoint(data_dir, existing.info.run_id):
        run_id, resume = existing.info.run_id, True
        tracking.reopen_run(tracking_uri, run_id)
    else:
        if existing is not None:
            # Stopped before its first checkpoint: start over in a fresh run,
            # so the trial keeps one run and each epoch is logged once.
            tracking.delete_run(tracking_uri, existing.info.run_id)
        run_id = tracking.open_run(
            spec,
            tracking_uri,
            data_dir,
            parent_run_id=parent,
            extra_tags={
                "role": "trial",
                "sweep": context["name"],
                "trial": payload["key"],
                "trial_overrides": json.dumps(payload["overrides"], sort_keys=True),
            },
        )
    paths = {split: Path(path) for split, path in context["paths"][spec.data.dataset].items()}
    try:
        fit_job(
            spec, paths, tracking_uri, run_id, data_dir, resume, callbacks=[TuneReportCallback()]
        )
    except BaseException as exc:
        tracking.mark_failed(tracking_uri, run_id, failure_tags(exc))
        raise
    tracking.end_run(tracking_uri, run_id, "FINISHED")


class _Progress:
    """Tune callback that logs trial events with counts and the best trial by its latest value."""

    def __init__(self, total: int, metric: str, mode: str, describe: dict[str, str]) -> None:
        self.total, self.metric, self.mode = total, metric, mode
        self.describe = describe
        self.done: set[str] = set()
        self.failed: set[str] = set()
        self.running: set[str] = set()
        self.latest: dict[str, float] = {}  # trial key -> its last reported metric value

    @staticmethod
    def key(trial) -> str:
        return trial.config["trial"]["key"]

    def summary(self) -> str:
        best = ""
        if self.latest:
            choose = max if self.mode == "max" else min
            key = choose(self.latest, key=self.latest.__getitem__)
            best = f"; best {self.metric} {self.latest[key]:.4f} ({key})"
        return (
            f"[{len(self.done)}/{self.total} done, {len(self.failed)} failed, "
            f"{len(self.running)} running{best}]"
        )

    def started(self, trial) -> None:
        key = self.key(trial)
        self.running.add(key)
        log.info("trial %s started (%s) %s", key, self.describe[key], self.summary())

    def result(self, trial, result: dict[str, Any]) -> None:
        key, value = self.key(trial), result.get(self.metric)
        if value is None:
            return
        self.latest[key] = float(value)
        epoch = result.get("epoch", "?")
        log.info("trial %s epoch %s: %s %.4f", key, epoch, self.metric, value)

    def ended(self, trial, failed: bool) -> None:
        key = self.key(trial)
        self.running.discard(key)
        (self.failed if failed else self.done).add(key)
        log.info("trial %s %s %s", key, "failed" if failed else "finished", self.summary())


def _callback(progress: _Progress):
    from ray import tune

    class ProgressCallback(tune.Callback):
        def on_trial_start(self, iteration, trials, trial, **info):
            progress.started(trial)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            progress.result(trial, result)

        def on_trial_complete(self, iteration, trials, trial, **info):
            progress.ended(trial, failed=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            progress.ended(trial, failed=True)

    return ProgressCallback()


def _concurrency(sweep: SweepSpec, spec: JobSpec) -> int:
    """Return how many trials run at once: the spec's max_concurrent, else what the cluster fits.

    Ray Train V2 places a trial's workers outside the Tune trial's own
    resources, so Tune alone would start every trial and their worker
    groups would wait for CPUs until Ray Train's start-up timeout. The cap
    keeps the number of worker groups to what the cluster can place.
    """
    import ray

    available = ray.cluster_resources()
    fits = math.floor(available.get("CPU", 0) / (spec.run.workers * spec.run.cpus_per_worker))
    if spec.run.use_gpu:
        gpus = available.get("GPU", 0) / (spec.run.workers * spec.run.gpus_per_worker)
        fits = min(fits, math.floor(gpus))
    if fits < 1:
        need = f"{spec.run.workers} x {spec.run.cpus_per_worker} CPU"
        if spec.run.use_gpu:
            need += f" and {spec.run.workers} x {spec.run.gpus_per_worker} GPU"
        raise SweepError(
            f"a trial needs {need}, more than the Ray cluster has ({available}); "
            "lower `resources` in the sweep spec"
        )
    if sweep.max_concurrent and sweep.max_concurrent > fits:
        log.warning(
            "max_concurrent %d exceeds the %d trials the cluster can place; "
            "the extra trials would wait for workers",
            sweep.max_concurrent,
            fits,
        )
        return sweep.max_concurrent
    return sweep.max_concurrent or fits


def _scheduler(sweep: SweepSpec, epochs: int):
    if sweep.scheduler.name == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr="epoch",
        metric=sweep.scheduler.metric,
        mode=sweep.scheduler.mode,
        max_t=epochs,
        grace_period=sweep.scheduler.grace_period,
        reduction_factor=sweep.scheduler.reduction_factor,
    )


@dataclass(frozen=True)
class SweepOutcome:
    record: SweepRecord
    statuses: dict[str, str]  # trial key -> MLflow status
    wall_seconds: float


def open_sweep(sweep: SweepSpec, data_dir: Path) -> SweepRecord:
    """Create the sweep's folder, parent MLflow run and record, or return the existing ones.

    Raises:
        SweepError: a sweep of this name exists with a different spec.
    """
    folder = sweeps_root(data_dir, sweep.storage_path) / sweep.name
    record_file = folder / RECORD_NAME
    print_hash = fingerprint(sweep)
    if record_file.is_file():
        record = SweepRecord(**json.loads(record_file.read_text()))
        if record.fingerprint != print_hash:
            raise SweepError(
                f"sweep {sweep.name!r} already exists in {folder} with a different spec; "
                f"continue it with `rmctl sweep --resume {sweep.name}`, or give this one "
                "another name (--set name=...)"
            )
        return record
    tracking_uri = tracking.resolve_tracking_uri(sweep.tracking_uri, data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    parent = tracking.open_sweep_run(
        sweep.name,
        sweep.experiment,
        tracking_uri,
        data_dir,
        tags={"sweep_fingerprint": print_hash},
    )
    spec_file = folder / "sweep_spec.json"
    spec_file.write_text(json.dumps(sweep.model_dump(mode="json"), indent=2))
    tracking.log_artifact_files(tracking_uri, parent, [spec_file], "sweep")
    record = SweepRecord(
        name=sweep.name,
        fingerprint=print_hash,
        spec=sweep.model_dump(mode="json"),
        parent_run_id=parent,
        tracking_uri=tracking_uri,
        folder=str(folder),
        created=time.time(),
    )
    record.save()
    return record


def run_sweep(record: SweepRecord, data_dir: Path, address: str | None = None) -> SweepOutcome:
    """Run (or continue) every trial of a sweep under Ray Tune and close its parent run.

    Trials that finished before are not run again; trials that were
    interrupted continue from their last checkpoint; failed trials stay
    failed. Returns each trial's final MLflow status.
    """
    from ray import tune

    started = time.perf_counter()
    sweep = record.sweep
    trials = expand(sweep)
    tracking.check_server(record.tracking_uri)
    # Every dataset is converted once, here; trials only read. Two trials that
    # ask for one dataset with different conversion options make `prepare` raise.
    paths: dict[str, dict[str, str]] = {}
    requests = {(t.spec.data.dataset, spec_options(t.spec.data)) for t in trials}
    for name, options in sorted(requests, key=str):
        prepared = prepare(name, data_dir, options=options)
        paths[name] = {split: str(path) for split, path in prepared.items()}
    try:
        init_ray(address)
    except ConnectionError as exc:
        # A rerun with the right address continues this parent run.
        tracking.mark_failed(record.tracking_uri, record.parent_run_id, {"error": str(exc)})
        raise
    tracking.reopen_run(record.tracking_uri, record.parent_run_id)

    context = {
        "name": sweep.name,
        "parent_run_id": record.parent_run_id,
        "tracking_uri": record.tracking_uri,
        "data_dir": str(data_dir),
        "paths": paths,
    }
    param_space = {
        "sweep": context,
        "trial": tune.grid_search([_trial_payload(trial) for trial in trials]),
    }
    # The trial function only waits on its trainer; the workers hold the CPUs.
    # Tune rejects an empty request, so the trial reserves a token amount of memory.
    trainable = tune.with_resources(_run_trial, {"CPU": 0, "memory": _TRIAL_MEMORY})
    metric = sweep.scheduler.metric
    progress = _Progress(
        len(trials), metric, sweep.scheduler.mode, {t.key: t.describe() for t in trials}
    )
    tune_path = Path(record.folder) / TUNE_FOLDER
    if tune.Tuner.can_restore(str(tune_path)):
        log.info("continuing sweep %s from Tune's saved state in %s", sweep.name, tune_path)
        tuner = tune.Tuner.restore(
            str(tune_path),
            trainable,
            resume_unfinished=True,
            resume_errored=False,
            restart_errored=False,
            param_space=param_space,
        )
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                max_concurrent_trials=_concurrency(sweep, trials[0].spec),
                scheduler=_scheduler(sweep, trials[0].spec.optim.epochs),
            ),
            run_config=tune.RunConfig(
                name=TUNE_FOLDER,
                storage_path=record.folder,
                verbose=0,
                callbacks=[_callback(progress)],
            ),
        )
    interrupted = True
    try:
        tuner.fit()
        interrupted = False
    finally:
        statuses = _close_trials(record, trials, stopped_early=not interrupted)
        parent_status = "KILLED" if interrupted else "FINISHED"
        counts = {s: sum(1 for v in statuses.values() if v == s) for s in set(statuses.values())}
        tracking.end_run(
            record.tracking_uri,
            record.parent_run_id,
            parent_status,
            {"trials": str(len(trials)), "trial_statuses": json.dumps(counts, sort_keys=True)},
        )
    return SweepOutcome(record, statuses, time.perf_counter() - started)


def _close_trials(record: SweepRecord, trials: list[Trial], stopped_early: bool) -> dict[str, str]:
    """Give every trial's MLflow run a final status; return trial key -> status.

    A run still RUNNING after Tune returned was stopped by the scheduler
    (ASHA) or lost with its actor: it is marked KILLED so that the UI does
    not show it as running forever. After an interrupted driver, runs are
    left as they are, because `--resume` continues them.
    """
    runs = {
        run.data.tags.get("trial"): run
        for run in tracking.child_runs(record.tracking_uri, record.parent_run_id)
    }
    statuses = {}
    for trial in trials:
        run = runs.get(trial.key)
        if run is None:
            statuses[trial.key] = "NOT_STARTED"
            continue
        status = run.info.status
        if status == "RUNNING" and stopped_early:
            status = "KILLED"
            tracking.end_run(
                record.tracking_uri, run.info.run_id, status, {"stopped_early": "true"}
            )
        statuses[trial.key] = status
    return statuses
