"""`rmctl`: validate specs, prepare data, run jobs and sweeps, report, open the MLflow UI.

Every command loads and validates its input first and exits with code 2 on
an invalid spec or argument, before anything starts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from resmom.data.registry import IMAGEFOLDER_PREFIX, NEEDS_CLASS_LIST, is_known_dataset
from resmom.paths import resolve_data_dir
from resmom.specs import DATASETS, SpecError, load_job, load_sweep, read_yaml_mapping

app = typer.Typer(
    help="Residual-momentum SSL experiments on Ray, FFCV and MLflow.", no_args_is_help=True
)
data_app = typer.Typer(help="Convert datasets into FFCV .beton files.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True)

DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help=(
            "Folder for .beton files and the local MLflow store "
            "[default: $RESMOM_DATA_DIR or ./data]."
        ),
    ),
]
OverrideOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set", help="Override a spec field by dotted path, e.g. --set rm.alpha=0.5; repeatable."
    ),
]

AddressOption = Annotated[
    str | None,
    typer.Option(help="Ray cluster address [default: $RAY_ADDRESS or a local instance]."),
]

EXIT_INVALID = 2
# The shell's codes for a process ended by SIGINT and SIGTERM: 128 + signal number.
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that cleanup runs as it does for Ctrl+C."""


def _raise_terminated(signum: int, frame) -> None:
    raise Terminated()


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _fail(message: str, code: int = 1) -> typer.Exit:
    # Escaped, because paths and values may contain "[...]", which Rich reads as markup.
    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return typer.Exit(code)


def _setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")


@app.command()
def validate(
    spec_file: Annotated[Path, typer.Argument(help="Job or sweep spec (YAML).")],
    overrides: OverrideOption = None,
) -> None:
    """Check a job spec, or a sweep spec and every trial it expands to, without running it."""
    from resmom.plan import expand

    try:
        # A sweep spec is the one with a `base` job; everything else is a job.
        if "base" in read_yaml_mapping(spec_file):
            sweep = load_sweep(spec_file, overrides)
            trials = expand(sweep)
            console.print(
                f"{spec_file}: valid sweep spec [bold]{sweep.name}[/] ({len(trials)} trials)"
            )
            return
        spec = load_job(spec_file, overrides)
    except SpecError as exc:
        raise _fail(str(exc), EXIT_INVALID) from None
    console.print(
        f"{spec_file}: valid job spec [bold]{spec.name}[/] ({spec.method.name}, {spec.variant})"
    )


@app.command()
def run(
    spec_file: Annotated[
        Path, typer.Argument(help="Job spec (YAML), e.g. jobs/digits_byol_rm.yaml.")
    ],
    overrides: OverrideOption = None,
    data_dir: DataDirOption = None,
    address: AddressOption = None,
    resume: Annotated[
        str | None,
        typer.Option(
            help="MLflow run id to continue from its last checkpoint, with the same spec."
        ),
    ] = None,
) -> None:
    """Train one job with DDP workers under Ray Train, logging to MLflow."""
    try:
        spec = load_job(spec_file, overrides)
    except SpecError as exc:
        raise _fail(str(exc), EXIT_INVALID) from None
    _setup_logging()

    from resmom.orchestrate import run_job
    from resmom.report import summary_table

    directory = resolve_data_dir(data_dir)
    console.print(
        f"[bold]{spec.name}[/]: {spec.method.name} ({spec.variant}, alpha={spec.rm.alpha}) on "
        f"{spec.data.dataset}, {spec.optim.epochs} epochs, {spec.run.workers} DDP workers"
    )
    try:
        result = run_job(spec, directory, address, resume_run_id=resume)
    except Exception as exc:  # noqa: BLE001 - any failure ends the command with its message
        raise _fail(f"run {spec.name} failed: {exc}") from None
    console.print(summary_table(spec, result))
    if result.tracking_uri.startswith("sqlite:"):
        hint = "rmctl ui" + (f" --data-dir {directory}" if data_dir else "")
        console.print(
            f"Open the MLflow UI with `{hint}` and browse experiment '{spec.run.experiment}'."
        )
    else:
        console.print(f"Runs are on the MLflow server at {result.tracking_uri}.")


@app.command()
def probe(
    run_id: Annotated[str, typer.Argument(help="MLflow run id of a finished job.")],
    data_dir: DataDirOption = None,
) -> None:
    """Fit linear probes on the frozen student and teacher of a run; log them to its MLflow run."""
    _setup_logging()
    from resmom.orchestrate import checkpoint_dir
    from resmom.probe.offline import run_linear_probe

    directory = resolve_data_dir(data_dir)
    saved = checkpoint_dir(directory, run_id) / "last.pt"
    try:
        metrics = run_linear_probe(run_id, directory, saved)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        raise _fail(str(exc)) from None
    table = Table(title=f"linear probe of run {run_id}")
    table.add_column("encoder")
    table.add_column("top-1", justify="right")
    for name in ("student", "teacher"):
        table.add_row(name, f"{metrics[f'probe/linear_top1_{name}']:.2%}")
    console.print(table)


class WriteMode(StrEnum):
    raw = "raw"
    jpg = "jpg"


@data_app.command("prepare")
def data_prepare(
    name: Annotated[
        str,
        typer.Argument(help=f"Dataset: {', '.join(DATASETS)}, or imagefolder:PATH."),
    ],
    source: Annotated[
        Path | None,
        typer.Option(
            help="Folder with the dataset's files in the layout torchvision's downloaders "
            "leave (see README); digits and imagefolder:PATH need none."
        ),
    ] = None,
    download: Annotated[
        bool,
        typer.Option(help="Download cifar10, cifar100 or stl10 into --source first (network)."),
    ] = False,
    write_mode: Annotated[
        WriteMode | None,
        typer.Option(help="Image storage: raw pixels or JPEG (default: the dataset's)."),
    ] = None,
    max_resolution: Annotated[
        int | None,
        typer.Option(
            min=8, max=65535, help="Maximum stored image side in pixels (default: the dataset's)."
        ),
    ] = None,
    jpeg_quality: Annotated[
        int, typer.Option(min=1, max=100, help="JPEG quality of --write-mode jpg.")
    ] = 90,
    workers: Annotated[
        int, typer.Option(min=1, help="Processes that check and convert images.")
    ] = max(1, min(8, os.cpu_count() or 1)),
    classes: Annotated[
        Path | None,
        typer.Option(help="Class-list file of imagenet100: one class folder name per line."),
    ] = None,
    data_dir: DataDirOption = None,
    force: Annotated[
        bool,
        typer.Option(help="Rewrite the .beton files even if valid ones exist, with any options."),
    ] = False,
) -> None:
    """Convert a dataset into train and test .beton files (with manifests) in the data folder."""
    if not is_known_dataset(name):
        raise _fail(
            f"unknown dataset {name!r}; accepted: {', '.join(DATASETS)}, imagefolder:PATH",
            EXIT_INVALID,
        )
    if name in NEEDS_CLASS_LIST and classes is None:
        raise _fail(f"{name} needs --classes FILE (one class folder name per line)", EXIT_INVALID)
    if source is not None and (name == "digits" or name.startswith(IMAGEFOLDER_PREFIX)):
        raise _fail(f"{name} takes no --source (got {source})", EXIT_INVALID)
    if download and source is None:
        raise _fail("--download needs --source, the folder to download into", EXIT_INVALID)
    _setup_logging()
    from resmom.data.beton import (
        ConversionOptions,
        DataError,
        check_beton,
        default_options,
        prepare,
    )

    defaults = default_options(name)
    try:
        options = ConversionOptions(
            write_mode.value if write_mode else defaults.write_mode,
            max_resolution if max_resolution is not None else defaults.max_resolution,
            jpeg_quality,
        )
        with _sigterm_raises():
            paths = prepare(
                name,
                resolve_data_dir(data_dir),
                force=force,
                source=source,
                options=options,
                workers=workers,
                download=download,
                classes_file=classes,
                verify_checksum=True,
            )
    except DataError as exc:
        raise _fail(str(exc)) from None
    except KeyboardInterrupt:
        raise _fail(
            f"conversion of {name} interrupted (SIGINT); the files it had written were removed",
            EXIT_INTERRUPTED,
        ) from None
    except Terminated:
        raise _fail(
            f"conversion of {name} stopped by SIGTERM; the files it had written were removed",
            EXIT_TERMINATED,
        ) from None
    for split, path in paths.items():
        manifest = check_beton(path)
        sizes = manifest["resolution"]
        console.print(
            f"{split}: {path} ({manifest['count']} images, {len(manifest['classes'])} classes, "
            f"{options.write_mode}, sides {sizes['min']}..{sizes['max']})"
        )


def _trial_table(sweep, trials) -> Table:
    table = Table(title=f"sweep {sweep.name}: {len(trials)} trials")
    table.add_column("trial")
    keys = list(dict.fromkeys(key for trial in trials for key in trial.overrides))
    for key in keys:
        table.add_column(key, justify="right")
    table.add_column("method")
    table.add_column("dataset")
    table.add_column("variant")
    for trial in trials:
        values = [_cell(trial.overrides.get(key)) for key in keys]
        spec = trial.spec
        table.add_row(trial.key, *values, spec.method.name, spec.data.dataset, spec.variant)
    return table


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _publish_report(record) -> int:
    """Write the sweep's report, log it to the parent run, print it; return failed trials."""
    from resmom import tracking
    from resmom.report.sweep import build_report, rich_table

    folder = Path(record.folder) / "report"
    report = build_report(record.name, record.tracking_uri, record.parent_run_id, folder)
    tracking.log_artifact_files(record.tracking_uri, record.parent_run_id, report.files, "report")
    console.print(rich_table(report.title, report.groups))
    failed = [row for row in report.rows if row.status == "FAILED"]
    for row in failed:
        console.print(f"[red]trial {row.key} failed[/]: {row.error or 'no error recorded'}")
    console.print(f"Report files: {folder} (also in the MLflow parent run {record.parent_run_id})")
    return len(failed)


@app.command()
def sweep(
    spec_file: Annotated[
        Path | None,
        typer.Argument(help="Sweep spec (YAML), e.g. sweeps/digits_alpha.yaml."),
    ] = None,
    overrides: OverrideOption = None,
    data_dir: DataDirOption = None,
    address: AddressOption = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the expanded trials and stop.")
    ] = False,
    resume: Annotated[
        str | None,
        typer.Option(help="Continue the interrupted sweep NAME from Tune's saved state."),
    ] = None,
) -> None:
    """Run every trial of a sweep under Ray Tune (each a Ray Train DDP job), then report.

    Exits with 1 when any trial failed, after the report.
    """
    from resmom import tracking
    from resmom.orchestrate.sweep import SweepError, load_record, open_sweep, run_sweep
    from resmom.plan import expand

    directory = resolve_data_dir(data_dir)
    if (spec_file is None) == (resume is None):
        raise _fail("give a sweep spec file or --resume NAME, not both", EXIT_INVALID)
    if resume is not None and overrides:
        raise _fail("--set cannot change a sweep that is resumed; it keeps its spec", EXIT_INVALID)
    try:
        if resume is not None:
            record = load_record(directory, resume)
            spec = record.sweep
        else:
            spec = load_sweep(spec_file, overrides)
        trials = expand(spec)
    except (SpecError, SweepError) as exc:
        raise _fail(str(exc), EXIT_INVALID) from None
    console.print(_trial_table(spec, trials))
    if dry_run:
        console.print(f"Dry run: {len(trials)} trials, nothing started.")
        return
    _setup_logging()
    try:
        # Before anything is written, so that a wrong URI opens no MLflow run.
        if resume is None:
            tracking.check_server(tracking.resolve_tracking_uri(spec.tracking_uri, directory))
            record = open_sweep(spec, directory)
        else:
            tracking.check_server(record.tracking_uri)
    except SweepError as exc:
        raise _fail(str(exc), EXIT_INVALID) from None
    except tracking.TrackingUnavailable as exc:
        raise _fail(str(exc)) from None
    try:
        outcome = run_sweep(record, directory, address)
    except KeyboardInterrupt:
        raise _fail(
            f"sweep {spec.name} interrupted; continue it with `rmctl sweep --resume {spec.name}`",
            130,
        ) from None
    except Exception as exc:  # noqa: BLE001 - any failure ends the command with its message
        raise _fail(f"sweep {spec.name} failed: {exc}") from None
    console.print(f"Sweep {spec.name} took {outcome.wall_seconds / 60:.1f} min.")
    if _publish_report(record):
        raise typer.Exit(1)


@app.command()
def report(
    name: Annotated[str, typer.Argument(help="Sweep name.")],
    data_dir: DataDirOption = None,
) -> None:
    """Tables and plots of a sweep: baseline against RM per dataset and method, over seeds."""
    from resmom.orchestrate.sweep import SweepError, load_record

    try:
        record = load_record(resolve_data_dir(data_dir), name)
    except SweepError as exc:
        raise _fail(str(exc), EXIT_INVALID) from None
    _publish_report(record)


@app.command("ls")
def list_sweeps(
    name: Annotated[str | None, typer.Argument(help="Sweep name: list its trials.")] = None,
    data_dir: DataDirOption = None,
) -> None:
    """List sweeps with their trials' statuses, or the trials of sweep NAME."""
    from resmom.orchestrate.sweep import SweepError, list_records, load_record
    from resmom.report.sweep import collect

    directory = resolve_data_dir(data_dir)
    if name is None:
        records = list_records(directory)
        if not records:
            console.print(f"No sweeps in {directory}.")
            return
        table = Table(title=f"sweeps in {directory}")
        for column in ("sweep", "started", "status", "trials", "MLflow parent run"):
            table.add_column(column)
        for record in records:
            rows = collect(record.tracking_uri, record.parent_run_id)
            counts: dict[str, int] = {}
            for row in rows:
                counts[row.status] = counts.get(row.status, 0) + 1
            total = len(_expand_quietly(record))
            summary = ", ".join(f"{n} {status.lower()}" for status, n in sorted(counts.items()))
            table.add_row(
                record.name,
                _when(record.created),
                _parent_status(record),
                f"{total}: {summary or 'none started'}",
                record.parent_run_id,
            )
        console.print(table)
        return
    try:
        record = load_record(directory, name)
    except SweepError as exc:
        raise _fail(str(exc), EXIT_INVALID) from None
    table = Table(title=f"sweep {name} ({_parent_status(record)})")
    for column in ("trial", "status", "values", "kNN student", "intra gap", "MLflow run"):
        table.add_column(column)
    rows = collect(record.tracking_uri, record.parent_run_id)
    for row in rows:
        knn = row.metrics.get("probe/knn_top1_student")
        gap = row.metrics.get("gap/intra_cos")
        table.add_row(
            row.key,
            "DIVERGED" if row.diverged else row.status,
            ", ".join(filter(None, [f"rm.alpha={row.alpha:g}", f"seed={row.seed}", row.setting])),
            "-" if knn is None else f"{knn:.2%}",
            "-" if gap is None else f"{gap:.4f}",
            row.run_id,
        )
    console.print(table)
    # Errors go below the table, where a narrow terminal does not cut them.
    for row in rows:
        if row.error:
            console.print(f"{row.key}: {row.error}", highlight=False, markup=False)


def _expand_quietly(record) -> list:
    from resmom.plan import expand

    return expand(record.sweep)


def _parent_status(record) -> str:
    from resmom import tracking

    return tracking.get_run(record.tracking_uri, record.parent_run_id).info.status


def _when(timestamp: float) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M")


@app.command()
def ui(
    data_dir: DataDirOption = None,
    port: Annotated[int, typer.Option(help="TCP port on 127.0.0.1.")] = 5000,
) -> None:
    """Serve the MLflow UI of the local store on 127.0.0.1."""
    from resmom.paths import local_artifact_root, local_tracking_uri

    directory = resolve_data_dir(data_dir)
    store = directory / "mlflow" / "mlflow.db"
    if not store.is_file():
        raise _fail(f"no local MLflow store at {store}; run a job first (`make demo`)")
    console.print(f"MLflow UI on http://127.0.0.1:{port} (Ctrl+C stops it)")
    # Loopback only: the UI has no authentication, and anyone who reaches it
    # can read and delete every run of the store.
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        local_tracking_uri(directory),
        "--default-artifact-root",
        local_artifact_root(directory).as_uri(),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    # The server starts uvicorn workers and job consumers of its own. In a
    # session of its own, all of them can be stopped as one group, which a
    # SIGTERM to this process alone would otherwise leave running.
    server = subprocess.Popen(command, env=os.environ.copy(), start_new_session=True)
    try:
        with _sigterm_raises():
            code = server.wait()
    except KeyboardInterrupt:
        _stop_process_group(server)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except Terminated:
        _stop_process_group(server)
        raise typer.Exit(EXIT_TERMINATED) from None
    raise typer.Exit(code)


def _stop_process_group(leader: subprocess.Popen, timeout: float = 10.0) -> None:
    """Stop the process group that `leader` leads: SIGTERM, then SIGKILL after `timeout` seconds.

    A process group id is not reused while any process of the group exists,
    so signalling it is safe even after the leader was reaped.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        leader.poll()  # reaps the leader, which counts as a member until then
        try:
            os.killpg(leader.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGKILL)


if __name__ == "__main__":
    app()
