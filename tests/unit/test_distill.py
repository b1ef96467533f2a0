"""KI loss and schedules against hand-written references (Qin et al., NAACL 2022, sections 2-3)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from ray_lifelong.distill import inheritance_rate, ki_loss, ki_loss_parts, teacher_needed


def reference(s, t, y, alpha, T, ignore=-100, top_k=None):
    """Position by position, in float64, straight from the formula."""
    total, n = 0.0, 0
    for i in range(s.shape[0]):
        if y[i] == ignore:
            continue
        ps = torch.softmax(s[i].double() / T, -1)
        pt = torch.softmax(t[i].double() / T, -1)
        if top_k is not None:
            idx = pt.topk(top_k).indices
            pt_k = pt[idx] / pt[idx].sum()
            kl = float((pt_k * (pt_k.log() - ps[idx].log())).sum())
        else:
            kl = float((pt * (pt.log() - ps.log())).sum())
        ce = -float(torch.log_softmax(s[i].double(), -1)[y[i]])
        total += (1 - alpha) * ce + alpha * T * T * kl
        n += 1
    return total / n


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), alpha=st.floats(0, 1), T=st.sampled_from([0.5, 1.0, 2.0, 4.0]),
       top_k=st.sampled_from([None, 1, 3, 10]))
def test_matches_reference(seed, alpha, T, top_k):
    g = torch.Generator().manual_seed(seed)
    s, t = torch.randn(12, 17, generator=g) * 3, torch.randn(12, 17, generator=g) * 3
    y = torch.randint(17, (12,), generator=g)
    y[::4] = -100
    got = ki_loss(s, t, y, alpha=alpha, temperature=T, top_k=top_k)
    assert float(got) == pytest.approx(reference(s, t, y, alpha, T, top_k=top_k), rel=1e-4, abs=1e-5)


def test_leading_dims_and_bf16_inputs_compute_in_float32():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 11, generator=g), torch.randn(2, 5, 11, generator=g)
    y = torch.randint(11, (2, 5), generator=g)
    flat = ki_loss(s.view(10, 11), t.view(10, 11), y.view(10), alpha=0.5)
    assert float(ki_loss(s, t, y, alpha=0.5)) == pytest.approx(float(flat))
    low = ki_loss(s.bfloat16(), t.bfloat16(), y, alpha=0.5)
    assert low.dtype == torch.float32
    assert float(low) == pytest.approx(float(flat), rel=2e-2)


def test_alpha_zero_is_plain_cross_entropy_and_needs_no_teacher():
    s, y = torch.randn(6, 9), torch.randint(9, (6,))
    assert float(ki_loss(s, torch.randn(6, 9), y, alpha=0.0)) == pytest.approx(float(F.cross_entropy(s, y)))
    assert float(ki_loss(s, None, y, alpha=0.0)) == pytest.approx(float(F.cross_entropy(s, y)))
    with pytest.raises(ValueError, match="needs teacher"):
        ki_loss(s, None, y, alpha=0.5)


def test_alpha_one_identical_teacher_gives_zero_kl():
    s, y = torch.randn(6, 9), torch.randint(9, (6,))
    parts = ki_loss_parts(s, s.clone(), y, alpha=1.0)
    assert float(parts.total) == pytest.approx(0.0, abs=1e-6) and float(parts.ce) > 0


def test_gradients_reach_student_not_teacher():
    s = torch.randn(4, 7, requires_grad=True)
    t = torch.randn(4, 7, requires_grad=True)
    ki_loss(s, t, torch.randint(7, (4,)), alpha=0.7).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_clear_errors():
    s, y = torch.randn(4, 7), torch.randint(7, (4,))
    with pytest.raises(ValueError, match="vocabulary"):
        ki_loss(s, torch.randn(4, 8), y, alpha=0.5)
    with pytest.raises(ValueError, match="same positions"):
        ki_loss(s, torch.randn(5, 7), y, alpha=0.5)
    with pytest.raises(ValueError, match="alpha"):
        ki_loss(s, s, y, alpha=1.5)


@pytest.mark.parametrize("schedule", ["linear", "step", "constant", "cosine"])
def test_schedule_endpoints_and_monotone(schedule):
    vals = [inheritance_rate(k, schedule=schedule, steps=100, alpha0=0.8) for k in range(0, 151)]
    assert vals[0] == pytest.approx(0.8)
    assert all(a >= b - 1e-12 for a, b in zip(vals, vals[1:]))  # never increases
    assert all(0 <= v <= 0.8 for v in vals)
    if schedule == "constant":
        assert vals[150] == 0.8 and teacher_needed(10_000, schedule=schedule, steps=100, alpha0=0.8)
    else:
        assert vals[100] == pytest.approx(0.0) and vals[150] == 0.0
        assert not teacher_needed(100, schedule=schedule, steps=100)
    if schedule == "linear":
        assert vals[50] == pytest.approx(0.4)
    if schedule == "step":
        assert vals[99] == 0.8
    if schedule == "cosine":
        assert vals[50] == pytest.approx(0.4) and vals[25] == pytest.approx(
            0.8 * (1 + math.cos(math.pi / 4)) / 2
        )
    with pytest.raises(ValueError):
        inheritance_rate(0, schedule="exp", steps=10)


def test_per_domain_teacher_routing_keeps_student_position_order():
    from ray_lifelong.config import ModelConfig
    from ray_lifelong.distill.teacher import teacher_logits
    from ray_lifelong.models.build import LMObjective, build_model

    cfg = ModelConfig(
        arch="bert",
        num_layers=1,
        hidden_size=16,
        num_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
        dropout=0.0,
    )
    a, b = build_model(cfg, 50, seed=1).eval(), build_model(cfg, 50, seed=2).eval()
    ids = torch.randint(5, 50, (4, 10))
    labels = torch.full_like(ids, -100)
    labels[0, [1, 2]], labels[1, 3], labels[2, [4, 5, 6]], labels[3, 7] = 7, 8, 9, 10
    dom = torch.tensor([0, 1, 0, 1])
    got = teacher_logits({0: a, 1: b}, ids, labels, dom, student_count=7)
    ref_a, ref_b = LMObjective(a)(ids, labels)[0], LMObjective(b)(ids, labels)[0]
    row = torch.tensor([0, 0, 1, 2, 2, 2, 3])
    want = torch.where((dom[row] == 0)[:, None], ref_a, ref_b)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(teacher_logits({-1: a}, ids, labels, dom, 7), ref_a.float())


def test_the_stage_loss_is_ki_while_alpha_is_positive_then_logit_kd_then_plain_cross_entropy():
    from torch.nn import functional as F

    from ray_lifelong.stage.step import stage_loss

    torch.manual_seed(0)
    logits = torch.randn(6, 11, requires_grad=True)
    targets = torch.randint(0, 11, (6,))
    teacher, previous = torch.randn(6, 11), torch.randn(2, 11)
    ce = F.cross_entropy(logits, targets)

    ki = stage_loss(logits, targets, alpha=0.4, teacher_logits=teacher, temperature=2.0,
                    previous_logits=previous)
    assert torch.equal(ki.total, ki_loss_parts(logits, teacher, targets, alpha=0.4, temperature=2.0).total)

    rows = torch.tensor([False, False, False, False, True, True])  # the replayed rows' positions
    kd = stage_loss(logits, targets, previous_logits=previous, previous_rows=rows, kd_weight=0.5,
                    kd_temperature=2.0)
    p, q = F.log_softmax(previous / 2, -1), F.log_softmax(logits[rows] / 2, -1)
    kl = 4 * (p.exp() * (p - q)).sum(-1).mean()
    assert torch.allclose(kd.total, ce + 0.5 * kl) and torch.allclose(kd.kl, kl) and torch.allclose(kd.ce, ce)
    assert not kd.ce.requires_grad and kd.total.requires_grad

    # inheritance is over: the teacher is unused
    plain = stage_loss(logits, targets, alpha=0.0, teacher_logits=teacher)
    assert torch.equal(plain.total, ce) and plain.kl == 0.0
    plain.total.backward()
    assert logits.grad is not None
