"""The lab's scale search (table.scaled_merges): one merge at scale 1, then lerp from the method's anchor, must
equal merging at each scale directly, for every method it is used for."""
import pytest
import torch

from centered_merge.lab.table import SCALE_PARAMS, merge_models, scaled_merges


def _models(seed: int = 0, T: int = 4):
    g = torch.Generator().manual_seed(seed)
    base = {"l0.weight": torch.randn(24, 16, generator=g), "l0.bias": torch.randn(24, generator=g),
            "l1.weight": torch.randn(8, 24, generator=g), "norm.weight": torch.randn(8, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(T)]
    return base, fts


CASES = [
    ("task_arithmetic", {}),
    ("ties", {"density": 0.3}),
    ("cart", {"rank": 0.25, "svd": "exact"}),
    ("cart", {"rank": 0.25, "svd": "randomized", "seed": 3}),
    ("tsv", {"svd": "exact"}),
    ("iso_c", {}),
    ("iso_cts", {"svd": "exact"}),
]


@pytest.mark.parametrize("method,params", CASES)
def test_scaled_merges_equal_direct_merges(method, params):
    base, fts = _models()
    key = SCALE_PARAMS[method][0]
    scales = (0.3, 1.0, 2.5)
    got = list(scaled_merges(fts, base, method, [{**params, key: s} for s in scales]))
    assert [p[key] for p, _ in got] == list(scales)
    for (p, merged), s in zip(got, scales):
        direct = merge_models(fts, base, method, {**params, key: s})
        assert merged.keys() == direct.keys()
        for k in direct:
            torch.testing.assert_close(merged[k], direct[k], rtol=1e-5, atol=1e-5, msg=f"{method} {k} at {s}")


def test_groups_by_the_other_parameters():
    base, fts = _models(1)
    cfgs = [{"rank": r, "lam": l, "svd": "exact"} for r in (0.1, 0.5) for l in (1.0, 2.0)]
    got = list(scaled_merges(fts, base, "cart", cfgs))
    assert [p for p, _ in got] == cfgs
    # different ranks give different merges at the same lambda
    assert not torch.allclose(got[0][1]["l0.weight"], got[2][1]["l0.weight"])
