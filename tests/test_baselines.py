"""Weight averaging, task arithmetic, TIES and DARE against small hand-worked examples."""
import pytest
import torch

import centered_merge as cm
from centered_merge.ops import reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def sd(**tensors):
    return {k: torch.tensor(v) for k, v in tensors.items()}


@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_average(dtype):
    models = [{"w": torch.tensor([1.0, 2.0], dtype=dtype)}, {"w": torch.tensor([3.0, 6.0], dtype=dtype)}]
    assert cm.merge(models, "weight_average")["w"].tolist() == [2.0, 4.0]
    got = cm.merge(models, "weight_average", weights=[3, 1])["w"]
    assert got.dtype == dtype and got.tolist() == [1.5, 3.0]


@pytest.mark.parametrize("dtype", DTYPES)
def test_task_arithmetic_hand_worked(dtype):
    base = {"w": torch.tensor([1.0, 2.0], dtype=dtype)}
    models = [{"w": torch.tensor([2.0, 2.0], dtype=dtype)}, {"w": torch.tensor([1.0, 4.0], dtype=dtype)}]
    got = cm.merge(models, "task_arithmetic", base=base, lam=0.5)["w"]
    # tau = [1, 0] and [0, 2]; base + 0.5 * [1, 2]
    assert got.dtype == dtype and got.tolist() == [1.5, 3.0]


TAUS = [
    [3.0, -1.0, 0.5, 2.0, 0.0],
    [-4.0, 2.0, -0.5, 1.0, 0.0],
    [2.0, -3.0, 1.0, -0.2, 0.0],
]


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_hand_worked(dtype):
    """density 0.4 of 5 entries keeps 2 per task:
    trimmed: [3,0,0,2,0], [-4,2,0,0,0], [2,-3,0,0,0]; sign sums [1,-1,0,2,0] -> elected [+,-,0,+,0];
    disjoint means: entry 0 -> mean(3, 2) = 2.5; entry 1 -> -3; entry 3 -> 2; others 0."""
    base = {"w": torch.ones(5, dtype=dtype)}
    models = [{"w": (torch.ones(5) + torch.tensor(t)).to(dtype)} for t in TAUS]
    got = cm.merge(models, "ties", base=base, density=0.4, lam=1.0)["w"]
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), torch.tensor([3.5, -2.0, 1.0, 3.0, 1.0]), rtol=1e-2, atol=1e-2)
    half = cm.merge(models, "ties", base=base, density=0.4, lam=0.5)["w"]
    torch.testing.assert_close(half.float(), torch.tensor([2.25, -0.5, 1.0, 2.0, 1.0]), rtol=1e-2, atol=1e-2)


def test_ties_full_density_is_sign_filtered_mean():
    base = {"w": torch.zeros(3)}
    models = [sd(w=[1.0, -2.0, 4.0]), sd(w=[3.0, 1.0, -1.0])]
    got = cm.merge(models, "ties", base=base, density=1.0, lam=1.0)["w"]
    # signs: [+, -, +] elected from sums [4, -1, 3]; entry 1 keeps only -2; entry 2 keeps only 4
    assert got.tolist() == [2.0, -2.0, 4.0]


def test_ties_keeps_memory_promise_and_matches_dense_formula():
    """The two-pass twin equals the textbook formula evaluated with all task vectors stacked."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(33, 17, generator=g)
    ws = [base + torch.randn(33, 17, generator=g) for _ in range(5)]
    taus = torch.stack([w - base for w in ws])
    k = reference.kept_count(base.numel(), 0.3)
    thr = taus.reshape(5, -1).abs().topk(k, dim=1).values[:, -1]
    trimmed = torch.where(taus.abs() >= thr[:, None, None], taus, 0.0)
    elected = torch.sign(trimmed.sum(0))
    agree = (torch.sign(trimmed) == elected) & (trimmed != 0)
    want = base + 0.7 * (torch.where(agree, trimmed, 0.0).sum(0) / agree.sum(0).clamp(min=1))
    got = cm.merge([{"w": w} for w in ws], "ties", base={"w": base}, density=0.3, lam=0.7)["w"]
    torch.testing.assert_close(got, want)


def test_dare_mask_statistics_and_determinism():
    tau = torch.ones(100_000)
    out = reference.dare(tau, 0.9, seed=123)
    kept = (out != 0).float().mean().item()
    assert abs(kept - 0.1) < 0.01
    assert torch.allclose(out[out != 0], torch.tensor(10.0))
    assert torch.equal(out, reference.dare(tau, 0.9, seed=123))
    assert not torch.equal(out, reference.dare(tau, 0.9, seed=124))
    assert torch.equal(reference.dare(tau, 0.0, seed=1), tau)


def test_dare_method_unbiased_on_average():
    base = {"w": torch.zeros(50_000)}
    models = [{"w": torch.full((50_000,), 2.0)}, {"w": torch.full((50_000,), 4.0)}]
    got = cm.merge(models, "dare", base=base, p=0.5, lam=0.5)["w"]
    assert abs(got.mean().item() - 3.0) < 0.05
    assert torch.equal(got, cm.merge(models, "dare", base=base, p=0.5, lam=0.5)["w"])


def test_integer_buffers_pass_through():
    models = [{"w": torch.ones(2), "ids": torch.arange(4)} for _ in range(3)]
    out = cm.merge(models, "weight_average")
    assert torch.equal(out["ids"], torch.arange(4))
