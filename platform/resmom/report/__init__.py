"""Human-readable summaries of finished runs."""

from __future__ import annotations

from rich.table import Table

from resmom.orchestrate import JobResult
from resmom.specs import JobSpec

# (metric key, label, format) in display order.
_SUMMARY_ROWS = (
    ("probe/knn_top1_student", "kNN top-1, student", "{:.2%}"),
    ("probe/knn_top1_teacher", "kNN top-1, teacher", "{:.2%}"),
    ("probe/knn_gap", "kNN gap (teacher - student)", "{:+.2%}"),
    ("gap/intra_cos", "intra gap (1 - cos, same view)", "{:.4f}"),
    ("gap/inter_cos", "inter gap (1 - cos, other view)", "{:.4f}"),
    ("gap/intra_cos_backbone", "intra gap, backbone", "{:.4f}"),
    ("loss/total", "final loss", "{:.4f}"),
    ("perf/img_per_s", "throughput (img/s)", "{:.0f}"),
)


def summary_table(spec: JobSpec, result: JobResult) -> Table:
    """Return the end-of-run table: final probes and gaps, wall time, MLflow run id."""
    table = Table(title=f"{spec.name}: {spec.method.name} {spec.variant} (alpha={spec.rm.alpha})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    for key, label, fmt in _SUMMARY_ROWS:
        value = result.metrics.get(key)
        table.add_row(label, "missing" if value is None else fmt.format(value))
    table.add_row("wall time", f"{result.wall_seconds / 60:.1f} min")
    table.add_row("MLflow run id", result.run_id)
    return table
