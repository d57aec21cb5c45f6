"""Losses against hand-computed references (pure Python math on small tensors)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from trainer.losses import DistillLoss, alignment_loss, duplicate_mask, info_nce


def _unit(rows: list[list[float]]) -> list[list[float]]:
    return [[x / math.sqrt(sum(v * v for v in row)) for x in row] for row in rows]


def _cos(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    a, b = _unit(a), _unit(b)
    return [[sum(x * y for x, y in zip(ra, rb, strict=True)) for rb in b] for ra in a]


def _ref_info_nce(a, b, tau, groups=None) -> float:
    """Mean of both directions; same-group columns other than the positive leave the softmax."""
    sims = _cos(a, b)
    n = len(a)

    def direction(s) -> float:
        total = 0.0
        for i in range(n):
            kept = [j for j in range(n) if j == i or groups is None or groups[j] != groups[i]]
            denom = sum(math.exp(s[i][j] / tau) for j in kept)
            total += -math.log(math.exp(s[i][i] / tau) / denom)
        return total / n

    transposed = [[sims[j][i] for j in range(n)] for i in range(n)]
    return 0.5 * (direction(sims) + direction(transposed))


def _softmax(row: list[float]) -> list[float]:
    exps = [math.exp(x) for x in row]
    return [e / sum(exps) for e in exps]


def _ref_alignment(s, t, lam, tau) -> tuple[float, float]:
    su, tu = _unit(s), _unit(t)
    mse = sum(
        sum((x - y) ** 2 for x, y in zip(a, b, strict=True)) for a, b in zip(su, tu, strict=True)
    )
    mse /= len(s)
    st, tt = _cos(s, t), _cos(t, t)
    kl = 0.0
    for i in range(len(s)):
        p = _softmax([x / tau for x in st[i]])
        q = _softmax([x / tau for x in tt[i]])
        kl += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    return mse, lam * kl / len(s)


def _t(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


RNG_ROWS_A = [[0.3, -1.2, 0.5], [1.0, 0.1, -0.4], [-0.7, 0.9, 0.2], [0.2, 0.2, 1.5]]
RNG_ROWS_B = [[0.1, -1.0, 0.9], [0.8, -0.3, -0.2], [-0.5, 1.1, -0.1], [0.6, -0.2, 1.0]]


def test_info_nce_matches_closed_form_for_orthogonal_pairs():
    # sims = identity, τ = 1: each row is -log(e / (e + 1)) = log(1 + 1/e), in both directions
    eye = _t([[1.0, 0.0], [0.0, 1.0]])
    out = info_nce(eye, eye, temperature=1.0)
    assert out["loss"].item() == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-12)
    assert out["loss"] is out["contrastive_loss"]


@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_info_nce_matches_reference(tau):
    out = info_nce(_t(RNG_ROWS_A), _t(RNG_ROWS_B), temperature=tau)
    assert out["loss"].item() == pytest.approx(
        _ref_info_nce(RNG_ROWS_A, RNG_ROWS_B, tau), rel=1e-10
    )


def test_info_nce_is_asymmetric_per_direction_but_symmetric_overall():
    ab = info_nce(_t(RNG_ROWS_A), _t(RNG_ROWS_B), temperature=0.5)["loss"]
    ba = info_nce(_t(RNG_ROWS_B), _t(RNG_ROWS_A), temperature=0.5)["loss"]
    assert ab.item() == pytest.approx(ba.item(), rel=1e-12)


def test_info_nce_normalizes_its_inputs():
    scaled = [[3.0 * x for x in row] for row in RNG_ROWS_A]
    plain = info_nce(_t(RNG_ROWS_A), _t(RNG_ROWS_B), temperature=0.2)["loss"]
    assert info_nce(_t(scaled), _t(RNG_ROWS_B), temperature=0.2)["loss"].item() == pytest.approx(
        plain.item(), rel=1e-12
    )


def test_info_nce_masks_in_batch_duplicates():
    # the same image twice in a batch: unmasked, each row has two equal logits (loss log 2);
    # masked, the duplicate leaves the denominator and the loss is exactly 0
    x = [[1.0, 0.0], [1.0, 0.0]]
    assert info_nce(_t(x), _t(x), temperature=1.0)["loss"].item() == pytest.approx(math.log(2))
    masked = info_nce(_t(x), _t(x), temperature=1.0, group_ids=[7, 7])["loss"]
    assert masked.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    "groups", [[0, 0, 1, 2], [0, 1, 0, 1], ["a.jpg", "a.jpg", "a.jpg", "b.jpg"]]
)
def test_info_nce_masking_matches_reference(groups):
    out = info_nce(_t(RNG_ROWS_A), _t(RNG_ROWS_B), temperature=0.3, group_ids=groups)
    ref = _ref_info_nce(RNG_ROWS_A, RNG_ROWS_B, 0.3, groups)
    assert out["loss"].item() == pytest.approx(ref, rel=1e-10)
    unmasked = info_nce(_t(RNG_ROWS_A), _t(RNG_ROWS_B), temperature=0.3)["loss"].item()
    assert out["loss"].item() != pytest.approx(unmasked, rel=1e-6)


def test_info_nce_distinct_groups_change_nothing():
    masked = info_nce(_t(RNG_ROWS_A), _t(RNG_ROWS_B), temperature=0.3, group_ids=torch.arange(4))
    plain = info_nce(_t(RNG_ROWS_A), _t(RNG_ROWS_B), temperature=0.3)
    assert masked["loss"].item() == pytest.approx(plain["loss"].item(), rel=1e-12)


def test_duplicate_mask_excludes_the_diagonal():
    mask = duplicate_mask([1, 1, 2], 3, device=torch.device("cpu"))
    assert mask.tolist() == [[False, True, False], [True, False, False], [False, False, False]]


def test_info_nce_rejects_bad_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        info_nce(torch.ones(3, 2), torch.ones(2, 2), temperature=1.0)
    with pytest.raises(ValueError, match="one id per row"):
        info_nce(torch.ones(3, 2), torch.ones(3, 2), temperature=1.0, group_ids=[0, 1])


def test_info_nce_gradients_flow_and_stay_finite_with_masking():
    a = _t(RNG_ROWS_A).requires_grad_(True)
    b = _t(RNG_ROWS_B).requires_grad_(True)
    log_tau = torch.tensor(math.log(0.1), dtype=torch.float64, requires_grad=True)
    info_nce(a, b, temperature=log_tau.exp(), group_ids=[0, 0, 1, 1])["loss"].backward()
    for grad in (a.grad, b.grad, log_tau.grad):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_alignment_matches_closed_form():
    # s = [e1, e2], t = [e2, e1], τ = 1: ‖s − t‖² = 2 per row; KL per row = (e − 1) / (e + 1)
    s, t = [[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [1.0, 0.0]]
    out = alignment_loss(_t(s), _t(t), lam=0.5, temperature=1.0)
    kl = (math.e - 1) / (math.e + 1)
    assert out["align_mse_loss"].item() == pytest.approx(2.0, abs=1e-12)
    assert out["align_kl_loss"].item() == pytest.approx(0.5 * kl, abs=1e-12)
    assert out["loss"].item() == pytest.approx(2.0 + 0.5 * kl, abs=1e-12)


@pytest.mark.parametrize(("lam", "tau"), [(1.0, 1.0), (0.25, 0.07)])
def test_alignment_matches_reference(lam, tau):
    out = alignment_loss(_t(RNG_ROWS_A), _t(RNG_ROWS_B), lam=lam, temperature=tau)
    mse, kl = _ref_alignment(RNG_ROWS_A, RNG_ROWS_B, lam, tau)
    assert out["align_mse_loss"].item() == pytest.approx(mse, rel=1e-10)
    assert out["align_kl_loss"].item() == pytest.approx(kl, rel=1e-8)
    assert out["loss"].item() == pytest.approx(mse + kl, rel=1e-10)


def test_alignment_is_zero_when_student_equals_teacher():
    out = alignment_loss(_t(RNG_ROWS_A), _t(RNG_ROWS_A), lam=1.0, temperature=0.1)
    assert out["loss"].item() == pytest.approx(0.0, abs=1e-12)


def test_distill_loss_weights_and_sums_its_terms():
    loss = DistillLoss(alpha=0.7, beta=2.0, temperature=0.2, lam=0.5)
    out = loss(_t(RNG_ROWS_A), _t(RNG_ROWS_B), group_ids=[0, 0, 1, 2])
    c = 0.7 * _ref_info_nce(RNG_ROWS_A, RNG_ROWS_B, 0.2, [0, 0, 1, 2])
    d = 2.0 * sum(_ref_alignment(RNG_ROWS_A, RNG_ROWS_B, 0.5, 0.2))
    assert set(out) == {"contrastive_loss", "distill_loss", "loss"}
    assert out["contrastive_loss"].item() == pytest.approx(c, rel=1e-8)
    assert out["distill_loss"].item() == pytest.approx(d, rel=1e-8)
    assert out["loss"].item() == pytest.approx(c + d, rel=1e-8)


def test_distill_loss_never_sends_gradients_into_given_teacher_embeddings():
    student = _t(RNG_ROWS_A).requires_grad_(True)
    teacher = _t(RNG_ROWS_B).requires_grad_(True)
    DistillLoss(temperature=0.1)(student, teacher)["loss"].backward()
    assert student.grad is not None and student.grad.abs().sum() > 0
    assert teacher.grad is None


def test_distill_loss_keeps_a_teacher_module_frozen_and_in_eval():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(5, 3), nn.Dropout(0.5))
    student = nn.Linear(5, 3)
    loss_fn = DistillLoss(alpha=1.0, beta=1.0, temperature=0.1, lam=1.0, teacher=teacher)
    assert not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert list(loss_fn.parameters()) == [] and loss_fn.state_dict() == {}
    loss_fn.train()
    teacher.train()  # someone else flips it; the loss must put it back
    x = torch.randn(6, 5)
    out = loss_fn(student(x), x)
    assert not teacher.training
    out["loss"].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in student.parameters())
    # in eval, dropout is off: the teacher's targets are deterministic
    again = loss_fn(student(x), x)
    assert again["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)


def test_distill_loss_passes_a_mapping_as_keyword_arguments():
    class KwTeacher(nn.Module):
        def forward(self, *, features: torch.Tensor) -> torch.Tensor:
            return features * 2

    loss_fn = DistillLoss(teacher=KwTeacher())
    x = _t(RNG_ROWS_B)
    out = loss_fn(_t(RNG_ROWS_A), {"features": x})
    assert out["loss"].item() == pytest.approx(DistillLoss()(_t(RNG_ROWS_A), x)["loss"].item())


def test_distill_loss_needs_a_tensor_without_teacher_module():
    with pytest.raises(TypeError, match="teacher's embeddings"):
        DistillLoss()(torch.ones(2, 3), [[1.0, 0.0, 0.0]])
