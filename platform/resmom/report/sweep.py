"""Sweep reports: baseline against RM per dataset and method, as tables and plots.

Numbers come from the trials' MLflow runs (their last logged value of each
metric), never from Tune's results, so a report of a resumed sweep, or one
written long after it ran, reads the same record as the MLflow UI.
"""

from __future__ import annotations

import csv
import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.table import Table

from resmom import tracking

# (metric key, column label, is a fraction shown in percent) in display order.
REPORT_METRICS = (
    ("probe/knn_top1_student", "kNN student", True),
    ("probe/knn_top1_teacher", "kNN teacher", True),
    ("probe/linear_top1_student", "linear student", True),
    ("probe/linear_top1_teacher", "linear teacher", True),
    ("gap/intra_cos", "intra gap", False),
)
# Differences against the baseline shown in the table and the CSV.
DELTA_METRICS = ("probe/knn_top1_student", "probe/linear_top1_student", "gap/intra_cos")
GAP_KEY = "gap/intra_cos"


@dataclass(frozen=True)
class TrialRow:
    key: str
    run_id: str
    status: str
    dataset: str
    method: str
    alpha: float
    seed: int
    setting: str  # the trial's other searched values, e.g. "optim.lr=0.05"
    metrics: dict[str, float]
    error: str | None = None
    diverged: bool = False


@dataclass
class Group:
    """The trials of one dataset, method, setting and alpha: one per seed."""

    dataset: str
    method: str
    setting: str
    alpha: float
    rows: list[TrialRow] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [row.metrics[key] for row in self.rows if key in row.metrics]

    def mean(self, key: str) -> float | None:
        values = self.values(key)
        return statistics.fmean(values) if values else None

    def std(self, key: str) -> float | None:
        values = self.values(key)
        if not values:
            return None
        return statistics.stdev(values) if len(values) > 1 else 0.0


def collect(tracking_uri: str, parent_run_id: str) -> list[TrialRow]:
    """Read every trial run of a sweep from MLflow."""
    rows = []
    for run in tracking.child_runs(tracking_uri, parent_run_id):
        tags, params = run.data.tags, run.data.params
        overrides = json.loads(tags.get("trial_overrides", "{}"))
        setting = ", ".join(
            f"{k}={_format_value(v)}"
            for k, v in sorted(overrides.items())
            if k not in ("seed", "rm.alpha")
        )
        rows.append(
            TrialRow(
                key=tags.get("trial", run.info.run_id[:8]),
                run_id=run.info.run_id,
                status=run.info.status,
                dataset=params.get("data.dataset", tags.get("dataset", "?")),
                method=params.get("method.name", tags.get("method", "?")),
                alpha=float(params.get("rm.alpha", "nan")),
                seed=int(params.get("seed", tags.get("seed", "0"))),
                setting=setting,
                metrics=dict(run.data.metrics),
                error=tags.get("error"),
                diverged=tags.get("diverged") == "true",
            )
        )
    return sorted(rows, key=lambda row: row.key)


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def group(rows: list[TrialRow]) -> list[Group]:
    """Finished trials grouped by dataset, method, setting and alpha, in that sort order."""
    groups: dict[tuple, Group] = {}
    for row in rows:
        if row.status != "FINISHED":
            continue
        key = (row.dataset, row.method, row.setting, row.alpha)
        groups.setdefault(key, Group(*key)).rows.append(row)
    return [groups[key] for key in sorted(groups)]


def baseline_of(target: Group, groups: list[Group]) -> Group | None:
    """The alpha = 0 group with the same dataset, method and setting as `target`."""
    for candidate in groups:
        if candidate.alpha == 0 and (candidate.dataset, candidate.method, candidate.setting) == (
            target.dataset,
            target.method,
            target.setting,
        ):
            return candidate
    return None


def _delta(target: Group, baseline: Group | None, key: str) -> float | None:
    if baseline is None or target is baseline:
        return None
    ours, theirs = target.mean(key), baseline.mean(key)
    return None if ours is None or theirs is None else ours - theirs


def _cell(mean: float | None, std: float | None, percent: bool, compact: bool = False) -> str:
    if mean is None:
        return "-"
    if compact:
        return f"{100 * mean:.1f}±{100 * std:.1f}" if percent else f"{mean:.3f}±{std:.3f}"
    if percent:
        return f"{100 * mean:.2f} ± {100 * std:.2f}"
    return f"{mean:.4f} ± {std:.4f}"


def _delta_cell(value: float | None, percent: bool, compact: bool = False) -> str:
    if value is None:
        return "-"
    if compact:
        return f"{100 * value:+.1f}" if percent else f"{value:+.3f}"
    return f"{100 * value:+.2f}" if percent else f"{value:+.4f}"


def _header() -> list[str]:
    columns = ["dataset", "method", "setting", "alpha", "seeds"]
    columns += [label for _, label, _ in REPORT_METRICS]
    columns += [f"Δ {_label(key)} vs alpha 0" for key in DELTA_METRICS]
    return columns


def _label(key: str) -> str:
    return next(label for k, label, _ in REPORT_METRICS if k == key)


def _is_percent(key: str) -> bool:
    return next(percent for k, _, percent in REPORT_METRICS if k == key)


def table_rows(groups: list[Group], compact: bool = False) -> list[list[str]]:
    """Format table cells: mean ± std over seeds (accuracies in %), then the deltas.

    `compact` drops a digit and the spaces, for terminals.
    """
    rows = []
    for target in groups:
        baseline = baseline_of(target, groups)
        cells = [
            target.dataset,
            target.method,
            target.setting or "-",
            f"{target.alpha:g}",
            str(len(target.rows)),
        ]
        cells += [
            _cell(target.mean(k), target.std(k), pct, compact) for k, _, pct in REPORT_METRICS
        ]
        cells += [
            _delta_cell(_delta(target, baseline, k), _is_percent(k), compact) for k in DELTA_METRICS
        ]
        rows.append(cells)
    return rows


def rich_table(title: str, groups: list[Group]) -> Table:
    """Build the terminal table: the compact cells, without columns that are empty or constant.

    A column with one value in every row (one dataset, one method) moves
    into the title.
    """
    header, rows = _header(), table_rows(groups, compact=True)
    keep, constant = [], []
    for i in range(len(header)):
        values = {row[i] for row in rows}
        if values == {"-"}:
            continue
        if i < 2 and len(values) == 1 and len(rows) > 1:
            constant.append(rows[0][i])
            continue
        keep.append(i)
    if constant:
        title = f"{title} ({', '.join(constant)})"
    table = Table(title=title)
    for i in keep:
        short = (
            header[i].replace(" vs alpha 0", "").replace("student", "st.").replace("teacher", "te.")
        )
        table.add_column(short, justify="left" if i < 3 else "right")
    for row in rows:
        table.add_row(*(row[i] for i in keep))
    return table


def markdown(title: str, groups: list[Group], rows: list[TrialRow]) -> str:
    header = _header()
    lines = [f"# {title}", ""]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + " --- |" * len(header))
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(groups)]
    lines += [
        "",
        "Accuracies in %, mean ± standard deviation over seeds (finished trials only); "
        "Δ is the difference of means against alpha 0 with the same dataset, method and setting.",
        "",
        "## Trials",
        "",
        "| trial | status | dataset | method | alpha | seed | setting | kNN student | run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        knn = row.metrics.get("probe/knn_top1_student")
        lines.append(
            f"| {row.key} | {row.status} | {row.dataset} | {row.method} | {row.alpha:g} | "
            f"{row.seed} | {row.setting or '-'} | "
            f"{'-' if knn is None else f'{100 * knn:.2f}'} | {row.run_id} |"
        )
    return "\n".join(lines) + "\n"


def write_csv(path: Path, groups: list[Group]) -> None:
    """Write one CSV row per group with the raw mean, std and delta of every metric."""
    fields = ["dataset", "method", "setting", "alpha", "seeds"]
    for key, _, _ in REPORT_METRICS:
        fields += [f"{key}:mean", f"{key}:std"]
    fields += [f"{key}:delta" for key in DELTA_METRICS]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for target in groups:
            baseline = baseline_of(target, groups)
            row: dict[str, Any] = {
                "dataset": target.dataset,
                "method": target.method,
                "setting": target.setting,
                "alpha": target.alpha,
                "seeds": len(target.rows),
            }
            for key, _, _ in REPORT_METRICS:
                row[f"{key}:mean"] = _blank(target.mean(key))
                row[f"{key}:std"] = _blank(target.std(key))
            for key in DELTA_METRICS:
                row[f"{key}:delta"] = _blank(_delta(target, baseline, key))
            writer.writerow(row)


def _blank(value: float | None) -> float | str:
    return "" if value is None else value


def _series_name(dataset: str, method: str, setting: str) -> str:
    return f"{dataset} {method}" + (f" ({setting})" if setting else "")


def plot_alpha(path: Path, groups: list[Group], keys: tuple[str, ...], ylabel: str) -> None:
    """Plot metrics against alpha: one line per dataset, method, setting and metric, ± std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str, str], list[Group]] = defaultdict(list)
    for target in groups:
        series[(target.dataset, target.method, target.setting)].append(target)
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for name, members in sorted(series.items()):
        members.sort(key=lambda g: g.alpha)
        for key in keys:
            points = [
                (g.alpha, g.mean(key), g.std(key)) for g in members if g.mean(key) is not None
            ]
            if not points:
                continue
            alphas, means, stds = zip(*points, strict=True)
            scale = 100 if _is_percent(key) else 1
            axes.errorbar(
                alphas,
                [scale * m for m in means],
                yerr=[scale * s for s in stds],
                marker="o",
                capsize=3,
                label=f"{_series_name(*name)}: {_label(key)}",
            )
    axes.set_xlabel("alpha (weight of the residual-momentum term)")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def plot_gap_over_epochs(path: Path, groups: list[Group], tracking_uri: str) -> None:
    """Plot `gap/intra_cos` per epoch, averaged over seeds, one line per alpha and series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axes = plt.subplots(figsize=(6.4, 4.2))
    for target in groups:
        per_step: dict[int, list[float]] = defaultdict(list)
        for row in target.rows:
            for step, value in tracking.metric_history(tracking_uri, row.run_id, GAP_KEY):
                per_step[step].append(value)
        if not per_step:
            continue
        steps = sorted(per_step)
        variant = "baseline" if target.alpha == 0 else f"RM alpha={target.alpha:g}"
        axes.plot(
            steps,
            [statistics.fmean(per_step[s]) for s in steps],
            marker="." if len(steps) < 30 else None,
            label=f"{_series_name(target.dataset, target.method, target.setting)}: {variant}",
        )
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("epoch")
    axes.set_ylabel("intra gap, 1 - cos(student_v, teacher_v)")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


@dataclass(frozen=True)
class SweepReport:
    title: str
    rows: list[TrialRow]
    groups: list[Group]
    files: list[Path]


def build_report(name: str, tracking_uri: str, parent_run_id: str, folder: Path) -> SweepReport:
    """Collect a sweep's trials, write the CSV, Markdown and PNG files into `folder`.

    Returns:
        The report; its `files` are what was written.
    """
    rows = collect(tracking_uri, parent_run_id)
    groups = group(rows)
    finished = sum(1 for row in rows if row.status == "FINISHED")
    title = f"sweep {name}: {finished} of {len(rows)} trials finished"
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / "report.md", folder / "report.csv"]
    files[0].write_text(markdown(title, groups, rows))
    write_csv(files[1], groups)
    if groups:
        accuracy = folder / "alpha_accuracy.png"
        plot_alpha(
            accuracy,
            groups,
            tuple(
                k
                for k, _, pct in REPORT_METRICS
                if pct and any(g.mean(k) is not None for g in groups)
            ),
            "top-1 accuracy (%)",
        )
        gap = folder / "alpha_gap.png"
        plot_alpha(gap, groups, (GAP_KEY,), "intra gap, 1 - cos(student_v, teacher_v)")
        epochs = folder / "gap_epochs.png"
        plot_gap_over_epochs(epochs, groups, tracking_uri)
        files += [accuracy, gap, epochs]
    return SweepReport(title, rows, groups, files)
