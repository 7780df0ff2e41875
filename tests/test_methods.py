"""Methods, their losses against naive references, the queue, LARS and schedules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from resmom.specs import validate_job
from resmom.ssl.ema import ema_update
from resmom.ssl.losses import infonce, mocov2_loss, mocov3_loss, residual_distance
from resmom.ssl.queue import KeyQueue
from resmom.ssl.step import build, forward_step
from resmom.train.optim import LARS, build_optimizer
from resmom.train.schedules import alpha_at, constant_momentum


def _naive_infonce(queries, keys, positives, temperature):
    total = 0.0
    for i, query in enumerate(queries):
        sims = [float(F.cosine_similarity(query, key, dim=0)) / temperature for key in keys]
        log_sum = math.log(sum(math.exp(s) for s in sims))
        total += log_sum - sims[positives[i]]
    return total / len(queries)


def test_infonce_matches_naive():
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(4, 5, generator=generator)
    keys = torch.randn(7, 5, generator=generator)
    positives = torch.tensor([0, 3, 6, 2])
    expected = _naive_infonce(queries, keys, positives.tolist(), 0.5)
    assert infonce(queries, keys, positives, 0.5).item() == pytest.approx(expected, rel=1e-5)


def test_mocov3_loss_matches_naive():
    generator = torch.Generator().manual_seed(1)
    student = torch.randn(2, 3, 4, generator=generator)
    teacher = torch.randn(2, 3, 4, generator=generator)
    positives = [0, 1, 2]
    expected = (
        (
            _naive_infonce(student[0], teacher[1], positives, 0.2)
            + _naive_infonce(student[1], teacher[0], positives, 0.2)
        )
        * 2
        * 0.2
    )
    assert mocov3_loss(student, teacher, 0, 0.2).item() == pytest.approx(expected, rel=1e-5)


def test_mocov2_loss_matches_naive():
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(2, 3, 4, generator=generator)
    teacher = torch.randn(2, 3, 4, generator=generator)
    queue = torch.randn(5, 4, generator=generator)
    terms = []
    for view, other in ((0, 1), (1, 0)):
        total = 0.0
        for b in range(3):
            # Keys of this query: its positive, then the queue (no other batch keys).
            keys = torch.cat([teacher[other, b : b + 1], queue])
            total += _naive_infonce(student[view, b : b + 1], keys, [0], 0.2)
        terms.append(total / 3)
    expected = sum(terms) / 2
    assert mocov2_loss(student, teacher, queue, 0.2).item() == pytest.approx(expected, rel=1e-5)


def test_contrastive_losses_send_no_gradient_to_keys():
    student = torch.randn(2, 3, 4, requires_grad=True)
    teacher = torch.randn(2, 3, 4, requires_grad=True)
    queue = torch.randn(6, 4, requires_grad=True)
    (mocov3_loss(student, teacher, 0, 1.0) + mocov2_loss(student, teacher, queue, 0.2)).backward()
    assert student.grad is not None
    assert teacher.grad is None
    assert queue.grad is None


def test_queue_replaces_oldest_block():
    queue = KeyQueue(size=6, dim=2)
    first = torch.tensor([[3.0, 0.0], [0.0, 2.0]])
    queue.push(first)
    assert torch.allclose(queue.keys[:2], torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    assert int(queue.pointer) == 2
    queue.push(torch.ones(2, 2))
    queue.push(-torch.ones(2, 2))
    assert int(queue.pointer) == 0
    queue.push(torch.tensor([[0.0, -5.0], [-5.0, 0.0]]))
    # The oldest block (first push) is replaced; the others stay.
    assert torch.allclose(queue.keys[:2], torch.tensor([[0.0, -1.0], [-1.0, 0.0]]))
    assert torch.allclose(queue.keys[2:4], torch.full((2, 2), 1 / math.sqrt(2)))


def test_loaded_queue_continues_at_its_saved_pointer():
    saved = KeyQueue(size=6, dim=2)
    saved.push(torch.ones(2, 2))
    restored = KeyQueue(size=6, dim=2)
    restored.push(torch.ones(2, 2))
    restored.push(torch.ones(2, 2))  # its host copy of the pointer is now 4
    restored.load_state_dict(saved.state_dict())
    restored.push(-torch.ones(2, 2))
    assert int(restored.pointer) == 4
    assert torch.allclose(restored.keys[2:4], torch.full((2, 2), -1 / math.sqrt(2)))


def test_queue_rejects_block_not_dividing_size():
    with pytest.raises(ValueError, match="do not divide"):
        KeyQueue(size=6, dim=2).push(torch.ones(4, 2))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"method": {"name": "byol", "queue_size": 512}}, "byol uses no queue"),
        ({"method": {"name": "mocov2", "queue_size": 1000}}, r"multiple of 2 \* optim.batch_size"),
        ({"method": {"name": "mocov2", "predictor_hidden_dim": 64}}, "no predictor"),
        ({"model": {"backbone": "vit_tiny", "patch_size": 5}}, "multiple of model.patch_size"),
    ],
)
def test_incompatible_method_options_rejected(override, message):
    raw = {"name": "x", "optim": {"batch_size": 128}, **override}
    with pytest.raises(ValueError, match=message):
        validate_job(raw)


def test_method_defaults_resolved_and_overridable():
    mocov2 = validate_job({"name": "x", "method": {"name": "mocov2"}}).method
    assert (mocov2.queue_size, mocov2.temperature, mocov2.momentum_base) == (65536, 0.2, 0.999)
    assert mocov2.momentum_schedule == "constant"
    mocov3 = validate_job({"name": "x", "method": {"name": "mocov3", "temperature": 0.2}}).method
    assert mocov3.temperature == 0.2
    assert mocov3.momentum_schedule == "cosine"


def test_residual_distances_by_hand():
    student = torch.tensor([[[1.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 2.0]]])
    assert residual_distance(student, teacher, "cosine").item() == pytest.approx(2.0)
    assert residual_distance(student, teacher, "l2").item() == pytest.approx(1.0 + 4.0)
    # kd with temperature 1: -sum softmax(t) log softmax(s).
    target = torch.softmax(teacher[0, 0], 0)
    expected = -(target * torch.log_softmax(student[0, 0], 0)).sum().item()
    assert residual_distance(student, teacher, "kd", kd_temperature=1.0).item() == pytest.approx(
        expected
    )


def test_residual_distances_zero_gradient_into_teacher():
    for distance in ("cosine", "l2", "kd"):
        student = torch.randn(2, 3, 4, requires_grad=True)
        teacher = torch.randn(2, 3, 4, requires_grad=True)
        residual_distance(student, teacher, distance).backward()
        assert teacher.grad is None, distance
        assert student.grad is not None, distance


def test_lars_step_by_hand():
    weight = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # norm 5
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = LARS(
        [{"params": [weight]}, {"params": [bias], "weight_decay": 0.0, "lars_exclude": True}],
        lr=0.1,
        momentum=0.9,
        weight_decay=0.5,
        eta=0.01,
    )
    weight.grad = torch.tensor([0.5, 0.0])
    bias.grad = torch.tensor([2.0])
    optimizer.step()
    # decayed gradient d = g + 0.5 w = [2.0, 2.0], ||d|| = 2 sqrt 2;
    # scale = 0.01 * 5 / (2 sqrt 2); update = 0.1 * scale * d.
    scale = 0.01 * 5 / (2 * math.sqrt(2))
    expected = torch.tensor([3.0, 4.0]) - 0.1 * scale * torch.tensor([2.0, 2.0])
    assert torch.allclose(weight.detach(), expected, atol=1e-7)
    # The excluded bias takes a plain SGD step.
    assert bias.item() == pytest.approx(1.0 - 0.1 * 2.0)


def test_optimizers_exclude_biases_and_norms_from_decay():
    spec = validate_job(
        {"name": "x", "model": {"width": 4}, "optim": {"optimizer": "adamw", "weight_decay": 0.05}}
    )
    networks = build(spec)
    groups = build_optimizer(networks.student, spec.optim).param_groups
    assert groups[0]["weight_decay"] == 0.05
    assert groups[1]["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in groups[0]["params"])
    assert all(p.ndim <= 1 for p in groups[1]["params"])


def test_alpha_schedules():
    assert alpha_at(50, 100, 10, 2.0, "constant", 0) == 2.0
    assert alpha_at(5, 100, 10, 2.0, "warmup", 1.0) == pytest.approx(1.0)
    assert alpha_at(10, 100, 10, 2.0, "warmup", 1.0) == 2.0
    assert alpha_at(0, 100, 10, 2.0, "cosine", 0) == pytest.approx(2.0)
    assert alpha_at(50, 100, 10, 2.0, "cosine", 0) == pytest.approx(1.0)
    assert alpha_at(100, 100, 10, 2.0, "cosine", 0) == pytest.approx(0.0, abs=1e-12)
    assert constant_momentum(7, 100, 0.999) == 0.999


def _tiny_spec(method: str, backbone: str, alpha: float) -> dict:
    method_fields: dict = {"name": method, "projector_hidden_dim": 32, "projection_dim": 16}
    if method == "mocov2":
        method_fields["queue_size"] = 64
    else:
        method_fields["predictor_hidden_dim"] = 32
    return {
        "name": f"{method}-{backbone}",
        "data": {"resolution": 16},
        "model": {"backbone": backbone, "width": 4, "patch_size": 8},
        "method": method_fields,
        "rm": {"alpha": alpha},
        "optim": {"batch_size": 8, "lr": 0.05},
        "run": {"workers": 1},
    }


@pytest.mark.parametrize("backbone", ["resnet18", "vit_tiny"])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("method", ["byol", "mocov2", "mocov3"])
def test_method_trains_few_steps(method: str, backbone: str, alpha: float):
    torch.manual_seed(0)
    spec = validate_job(_tiny_spec(method, backbone, alpha))
    networks = build(spec)
    optimizer = build_optimizer(networks.student, spec.optim)
    before = [p.detach().clone() for p in networks.student.parameters()]
    teacher_before = [p.detach().clone() for p in networks.teacher.parameters()]
    for _ in range(3):
        view_a, view_b = torch.randn(2, 8, 3, 16, 16).unbind(0)
        out = forward_step(
            networks.student, networks.teacher, networks.queue, view_a, view_b, spec, alpha
        )
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        ema_update(networks.teacher, networks.student.encoder, 0.9)
        if networks.queue is not None:
            networks.queue.push(out.teacher_keys.flatten(0, 1))
        assert torch.isfinite(out.loss)
        if alpha == 0:
            assert out.loss.item() == pytest.approx(out.ssl_loss.item())
        else:
            assert out.loss.item() == pytest.approx(
                out.ssl_loss.item() + alpha * out.rm_loss.item(), rel=1e-5
            )
    assert any(
        not torch.equal(a, b) for a, b in zip(before, networks.student.parameters(), strict=True)
    )
    assert any(
        not torch.equal(a, b)
        for a, b in zip(teacher_before, networks.teacher.parameters(), strict=True)
    )
    assert all(not p.requires_grad for p in networks.teacher.parameters())
    if networks.queue is not None:
        assert int(networks.queue.pointer) == (3 * 16) % 64


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_autocast_step_finite(precision: str):
    torch.manual_seed(0)
    raw = _tiny_spec("mocov3", "resnet18", 1.0)
    raw["optim"]["precision"] = precision
    spec = validate_job(raw)
    networks = build(spec)
    view_a, view_b = torch.randn(2, 8, 3, 16, 16).unbind(0)
    with torch.autocast("cpu", dtype=torch.bfloat16 if precision == "bf16" else torch.float16):
        out = forward_step(
            networks.student, networks.teacher, networks.queue, view_a, view_b, spec, 1.0
        )
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(
        p.grad is None or torch.isfinite(p.grad).all() for p in networks.student.parameters()
    )


@pytest.mark.parametrize(("stem", "side"), [("cifar", 32), ("imagenet", 64)])
def test_resnet50_feature_size(stem: str, side: int):
    from resmom.models.resnet import ResNet

    network = ResNet("resnet50", width=8, stem=stem)
    features = network(torch.randn(2, 3, side, side))
    # Bottleneck stages end with 4x their width: 8 * 8 * 4 channels.
    assert features.shape == (2, 256)
    assert network.feature_dim == 256
