"""The worker loop in one process (no Ray): the method's effect and the probes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from resmom.probe.knn import knn_top1
from resmom.specs import validate_job
from resmom.train.loop import fit

CPU = torch.device("cpu")


# Sizes chosen by measurement: with one epoch of 22 steps, alpha 4 ended with
# 0.78-0.84 times the baseline's intra gap over seeds 0, 1 and 2.
RM_ALPHA = 4.0


def _small_spec(alpha: float, epochs: int = 1) -> dict:
    return {
        "name": f"gap-alpha-{alpha}",
        "seed": 0,
        "model": {"width": 8},
        "method": {"projector_hidden_dim": 128, "projection_dim": 32, "predictor_hidden_dim": 128},
        "rm": {"alpha": alpha},
        "optim": {"epochs": epochs, "batch_size": 64, "lr": 0.02},
        "run": {"workers": 1},
    }


@pytest.fixture(scope="module")
def gap_runs(digits_paths: dict[str, Path]) -> dict[float, list[dict[str, float]]]:
    """Per-epoch metrics of the same short training with alpha 0 and RM_ALPHA."""
    torch.set_num_threads(2)
    runs = {}
    for alpha in (0.0, RM_ALPHA):
        history: list[dict[str, float]] = []
        spec = validate_job(_small_spec(alpha))
        fit(
            spec,
            digits_paths["train"],
            digits_paths["test"],
            CPU,
            lambda _, m, __, h=history: h.append(m),
        )
        runs[alpha] = history
    return runs


def test_rm_lowers_intra_gap(gap_runs):
    baseline = gap_runs[0.0][-1]["gap/intra_cos"]
    residual = gap_runs[RM_ALPHA][-1]["gap/intra_cos"]
    # The residual term minimizes exactly this quantity; ask for a clear margin.
    assert residual < 0.9 * baseline, (residual, baseline)


def test_baseline_logs_rm_loss_without_using_it(gap_runs):
    last = gap_runs[0.0][-1]
    assert last["sched/alpha"] == 0.0
    assert last["loss/total"] == pytest.approx(last["loss/ssl"], rel=1e-6)
    assert last["loss/rm"] > 0


def test_metrics_finite_and_in_range(gap_runs):
    for history in gap_runs.values():
        assert len(history) == 1
        last = history[-1]
        assert all(torch.isfinite(torch.tensor(v)) for v in last.values())
        assert 0 <= last["probe/knn_top1_student"] <= 1
        assert 0 <= last["probe/knn_top1_teacher"] <= 1
        assert last["probe/knn_gap"] == pytest.approx(
            last["probe/knn_top1_teacher"] - last["probe/knn_top1_student"]
        )
        assert 0 <= last["perf/data_wait_frac"] <= 1
        # One epoch of 22 steps is too short for the online head to pass
        # chance reliably, so only its range is checked here.
        assert 0 <= last["probe/online_top1"] <= 1
        assert last["sched/momentum"] > 0.99


def test_same_seed_same_losses(digits_paths: dict[str, Path], gap_runs):
    spec = validate_job(_small_spec(RM_ALPHA))
    rerun = fit(spec, digits_paths["train"], digits_paths["test"], CPU)
    first = gap_runs[RM_ALPHA][-1]
    assert rerun["loss/total"] == pytest.approx(first["loss/total"], rel=1e-5)
    assert rerun["gap/intra_cos"] == pytest.approx(first["gap/intra_cos"], rel=1e-5)


def test_batch_larger_than_dataset_rejected(digits_paths: dict[str, Path]):
    raw = _small_spec(RM_ALPHA)
    raw["optim"]["batch_size"] = 4096
    with pytest.raises(ValueError, match="larger than the training split"):
        fit(validate_job(raw), digits_paths["train"], digits_paths["test"], CPU)


def test_knn_separable_clusters():
    generator = torch.Generator().manual_seed(0)
    centers = torch.eye(3) * 10
    bank_labels = torch.arange(3).repeat_interleave(20)
    bank = centers[bank_labels] + torch.randn(60, 3, generator=generator)
    query_labels = torch.arange(3).repeat(5)
    queries = centers[query_labels] + torch.randn(15, 3, generator=generator)
    assert (
        knn_top1(bank, bank_labels, queries, query_labels, k=5, temperature=0.1, num_classes=3)
        == 1.0
    )


def test_knn_weighted_vote_by_hand():
    # Two neighbours of class 0 at cos 0.6, one of class 1 at cos 1.0.
    # Weights exp(cos / 0.1): 2 * e^6 = 807 < e^10 = 22026, so class 1 wins.
    bank = torch.tensor([[0.6, 0.8], [0.6, -0.8], [1.0, 0.0]])
    bank_labels = torch.tensor([0, 0, 1])
    query = torch.tensor([[1.0, 0.0]])
    assert (
        knn_top1(bank, bank_labels, query, torch.tensor([1]), k=3, temperature=0.1, num_classes=2)
        == 1.0
    )
    # With a high temperature the votes are nearly equal and the majority wins.
    assert (
        knn_top1(bank, bank_labels, query, torch.tensor([0]), k=3, temperature=100.0, num_classes=2)
        == 1.0
    )


def test_linear_probe_separates_clusters():
    from resmom.probe.linear import fit_linear_probe, top1

    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=generator) * 5
    labels = torch.arange(4).repeat_interleave(30)
    features = centers[labels] + torch.randn(120, 8, generator=generator) + 100.0  # far from 0
    head = fit_linear_probe(features, labels, num_classes=4)
    assert top1(head, features, labels) == 1.0
    test_labels = torch.arange(4).repeat(5)
    test_features = centers[test_labels] + torch.randn(20, 8, generator=generator) + 100.0
    assert top1(head, test_features, test_labels) >= 0.9
