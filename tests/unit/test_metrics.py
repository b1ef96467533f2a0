import math

import pytest

from ray_lifelong.eval.metrics import average_increased_perplexity, average_perplexity, perplexity
from ray_lifelong.stage.schedule import lr_multiplier

# after stage i (rows) on domain j (columns)
PPL = [[10.0, 80.0, 90.0],
       [20.0, 12.0, 70.0],
       [40.0, 18.0, 8.0]]


def test_average_perplexity_geometric_by_hand():
    ap = average_perplexity(PPL)
    assert ap[0] == pytest.approx(10.0)
    assert ap[1] == pytest.approx(math.sqrt(20 * 12))
    assert ap[2] == pytest.approx((40 * 18 * 8) ** (1 / 3))


def test_average_perplexity_arithmetic_by_hand():
    assert average_perplexity(PPL, geometric=False) == pytest.approx([10.0, 16.0, 22.0])


def test_average_increased_perplexity_by_hand():
    ap_plus = average_increased_perplexity(PPL)
    assert ap_plus[0] is None
    assert ap_plus[1] == pytest.approx(20 - 10)
    assert ap_plus[2] == pytest.approx(((40 - 10) + (18 - 12)) / 2)


def test_no_forgetting_gives_zero_and_ragged_rows_fail():
    flat = [[5.0, 9.0], [5.0, 4.0]]
    assert average_increased_perplexity(flat)[1] == 0
    with pytest.raises(ValueError, match="row 1"):
        average_perplexity([[1.0, 2.0], [1.0]])


def test_perplexity():
    assert perplexity(2 * math.log(3.0), 2) == pytest.approx(3.0)
    assert perplexity(0.0, 0) == math.inf


def test_lr_schedule_endpoints_and_shape():
    total, warm = 100, 10
    assert lr_multiplier(0, total, warmup=warm) == pytest.approx(0.1)
    assert lr_multiplier(9, total, warmup=warm) == pytest.approx(1.0)
    assert lr_multiplier(total, total, warmup=warm) == pytest.approx(0.0)
    assert lr_multiplier(total, total, warmup=warm, decay="cosine", min_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(55, total, warmup=warm, decay="cosine") == pytest.approx(0.5)
    assert lr_multiplier(50, total, warmup=warm, decay="constant") == 1.0
    lin = [lr_multiplier(s, total, warmup=warm) for s in range(warm, total + 1)]
    assert all(a >= b for a, b in zip(lin, lin[1:]))
