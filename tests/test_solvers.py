import pytest
import torch

from lmprune.patterns import parse_pattern
from lmprune.solvers import Gram, get_solver, reconstruction_error


def planted(out=48, inp=128, tokens=1024, seed=0):
    """A layer whose inputs are strongly correlated (low-rank plus noise), so weight updates matter."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(inp, inp, generator=g) / inp**0.5
    x = torch.randn(tokens, 16, generator=g) @ torch.randn(16, inp, generator=g) + 0.3 * torch.randn(tokens, inp, generator=g) @ mix
    w = torch.randn(out, inp, generator=g)
    return w, Gram.from_inputs(x), x


def errors(pattern, s):
    w, gram, _ = planted()
    out = {}
    for name in ("magnitude", "wanda", "sparsegpt"):
        res = get_solver(name).function()(w, gram, parse_pattern(pattern), s)
        used = res.pattern or parse_pattern(pattern)
        assert used.verify(res.weight, used.effective_sparsity(s)).ok
        out[name] = reconstruction_error(w, res.weight, gram)[1]
    return out


@pytest.mark.parametrize("pattern,s", [("unstructured", 0.5), ("unstructured", 0.8), ("2:4", 0.5),
                                       ("unstructured:row", 0.6), ("block:4", 0.5), ("row", 0.5)])
def test_sparsegpt_beats_magnitude(pattern, s):
    e = errors(pattern, s)
    assert e["sparsegpt"] < e["magnitude"]
    assert e["sparsegpt"] < e["wanda"]


def test_reconstruction_error_matches_definition():
    w, gram, x = planted()
    res = get_solver("sparsegpt").function()(w, gram, parse_pattern("unstructured"), 0.5)
    direct = ((x @ w.T - x @ res.weight.T) ** 2).sum() / ((x @ w.T) ** 2).sum()
    assert reconstruction_error(w, res.weight, gram)[1] == pytest.approx(direct.item(), rel=1e-3)


def test_reconstruction_error_float32_products_keep_small_errors():
    """The report's float32 panel products agree with float64 ones, in panels and whole, even for an error
    1e-7 of the reference (ALPS's attention matrices reach 6e-5)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 64, generator=g) * torch.linspace(0.1, 10, 64)
    gram = Gram.from_inputs(x)
    w = torch.randn(40, 64, generator=g)
    near = w + 1e-4 * torch.randn(40, 64, generator=g)
    for pruned in (near, get_solver("sparsegpt").function()(w, gram, parse_pattern("unstructured"), 0.5).weight):
        exact = reconstruction_error(w, pruned, gram, dtype=torch.float64)
        assert reconstruction_error(w, pruned, gram, rows=3, cols=5) == pytest.approx(exact, rel=1e-5)
        assert reconstruction_error(w, pruned, gram) == pytest.approx(exact, rel=1e-5)
    assert exact[1] > 1e-3 and reconstruction_error(w, near, gram)[1] < 1e-6


def test_sparsegpt_exact_counts_and_dead_inputs():
    w, gram, x = planted()
    x[:, :5] = 0
    gram = Gram.from_inputs(x)
    res = get_solver("sparsegpt").function()(w, gram, parse_pattern("unstructured"), 0.7)
    assert torch.count_nonzero(res.weight).item() == round(0.3 * w.numel())
    assert torch.isfinite(res.weight).all()
    assert (res.weight[:, :5] == 0).all()
    row = get_solver("sparsegpt").function()(w, gram, parse_pattern("unstructured:row"), 0.7)
    assert (torch.count_nonzero(row.weight, dim=1) == round(0.3 * w.shape[1])).all()


def test_sparsegpt_factorisation_in_place_is_the_out_of_place_one_bit_for_bit():
    """The CPU factorisation of ``(H + λI)⁻¹`` runs in the damped copy's own buffer; it must give exactly what the
    three out-of-place steps give, in the same layout, also when float rounding left ``H`` slightly asymmetric
    (only its lower triangle is read), and report an indefinite matrix the same way."""
    from lmprune.solvers.sparsegpt import _factor_of_inverse

    _, gram, _ = planted(inp=300)
    h = gram.damped(0.01, torch.float64)
    h += 1e-9 * torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    lower = torch.linalg.cholesky(h)
    expected = torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True).float()
    buffer = h.clone()
    upper, info = _factor_of_inverse(buffer)
    assert info == 0 and upper.data_ptr() == buffer.data_ptr()  # no second in x in float64 matrix
    got = upper.float()
    assert torch.equal(got, expected) and got.stride() == expected.stride()
    indefinite = -torch.eye(8, dtype=torch.float64)
    assert _factor_of_inverse(indefinite)[1] != 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spd_inverse_in_place_matches_torch(dtype):
    """ALPS's ridge inverses and SparseLLM's ``(βWᵀW + γI)⁻¹`` factorise and invert over their input's buffer:
    the values and the layout are torch's out-of-place ones."""
    from lmprune.solvers.spd import cholesky_, cholesky_inverse_

    _, gram, _ = planted(inp=200)
    a = gram.damped(0.01, dtype)
    expected = torch.cholesky_inverse(torch.linalg.cholesky(a))
    buffer = a.clone()
    lower, info = cholesky_(buffer)
    inverse = cholesky_inverse_(lower)
    assert info == 0 and inverse.data_ptr() == buffer.data_ptr()
    assert torch.equal(inverse, expected) and inverse.stride() == expected.stride()


def test_cholesky_solve_with_the_factor_in_place_matches_torch():
    """SparseLLM's least-squares refits solve with the factor where it lies (two triangular solves) instead of
    ``torch.cholesky_solve``, which copies it: the same bits on this machine, for row- and column-major right-hand
    sides, and the factor untouched."""
    from lmprune.solvers.spd import cholesky_, cholesky_solve

    g = torch.Generator().manual_seed(3)
    for n, m in ((50, 7), (300, 77), (1000, 256)):
        a = torch.randn(n + 20, n, generator=g, dtype=torch.float64)
        lower, info = cholesky_((a.T @ a).add_(torch.eye(n, dtype=torch.float64)))
        assert info == 0
        kept = lower.clone()
        b = torch.randn(n, m, generator=g, dtype=torch.float64)
        expected = torch.cholesky_solve(b, lower)
        for rhs in (b, b.T.contiguous().mT):
            assert torch.equal(cholesky_solve(rhs, lower), expected), (n, m)
        assert torch.equal(lower, kept)


def test_wanda_is_per_row_and_scores_use_norms():
    w, gram, _ = planted()
    res = get_solver("wanda").function()(w, gram, parse_pattern("unstructured"), 0.5)
    assert (torch.count_nonzero(res.weight, dim=1) == w.shape[1] // 2).all()
    kept = res.mask
    assert torch.equal(res.weight[kept], w[kept])


def test_solvers_are_deterministic():
    w, gram, _ = planted()
    a = get_solver("sparsegpt").function()(w, gram, parse_pattern("unstructured"), 0.6)
    b = get_solver("sparsegpt").function()(w, Gram(gram.matrix.clone(), gram.n_tokens), parse_pattern("unstructured"), 0.6)
    assert torch.equal(a.weight, b.weight)


def test_finiteness_is_checked_by_row_blocks(monkeypatch):
    """``all_finite`` answers as ``torch.isfinite(t).all()`` without a bool tensor of ``t``'s size (at 70B shape
    ``down_proj``'s Gram matrix's is 784 MiB, and it set a Wanda block's peak)."""
    from lmprune.solvers import base

    t = torch.randn(3000, 40)
    seen = []
    real = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda x: seen.append(x.numel()) or real(x))
    assert base.all_finite(t)
    assert max(seen) == 1024 * 40 and len(seen) == 3
    monkeypatch.setattr(torch, "isfinite", real)
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = t.clone()
        u[2500, 7] = bad
        assert not base.all_finite(u) and not base.all_finite(u.view(3000, 4, 10))
    assert base.all_finite(torch.tensor(1.0)) and not base.all_finite(torch.tensor(float("nan")))
    assert base.all_finite(torch.empty(0, 5))
