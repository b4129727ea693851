import pytest
import torch

from lmprune.patterns import parse_pattern
from lmprune.refiners.dsnot import Options, refine
from lmprune.solvers import Gram, get_solver


def _problem(seed=0, n=2048, din=128, dout=48, dead=()):
    torch.manual_seed(seed)
    # inputs with non-zero means and uneven scales, as after a norm layer
    x = torch.randn(n, din) * (0.2 + 2 * torch.rand(din)) + 0.5 * torch.randn(din)
    for j in dead:
        x[:, j] = 0
    w = torch.randn(dout, din)
    return w, Gram.from_inputs(x)


def _row_errors(w, w_hat, gram):
    d = (w - w_hat).double()
    return ((d @ gram.matrix.double()) * d).sum(1)


CASES = [
    ("unstructured", 0.7, "wanda"),
    ("unstructured", 0.7, "sparsegpt"),
    ("unstructured", 0.9, "magnitude"),
    ("unstructured:row", 0.6, "wanda"),
    ("unstructured:row", 0.8, "sparsegpt"),
    ("2:4", 0.5, "wanda"),
    ("2:4", 0.5, "sparsegpt"),
    ("4:8", 0.5, "magnitude"),
]


@pytest.mark.parametrize("spec,sparsity,solver", CASES)
def test_keeps_pattern_counts_and_never_increases_row_error(spec, sparsity, solver):
    w, gram = _problem(seed=CASES.index((spec, sparsity, solver)), dead=(3, 17))
    pattern = parse_pattern(spec)
    before = get_solver(solver).function()(w, gram, pattern, sparsity)
    after = refine(w, before, gram, pattern, sparsity)

    assert pattern.verify(after.weight, sparsity).ok == pattern.verify(before.weight, sparsity).ok
    # counts per row are unchanged; for N:M every group keeps exactly N
    assert torch.equal(before.mask.sum(1), after.mask.sum(1))
    if ":" in spec and spec[0].isdigit():
        n, m = pattern.n, pattern.m
        assert torch.all(after.mask.reshape(w.shape[0], -1, m).sum(-1) == n)
    assert torch.all(after.weight[~after.mask] == 0)

    e_before = _row_errors(w, before.weight, gram)
    e_after = _row_errors(w, after.weight, gram)
    assert torch.all(e_after <= e_before)
    assert after.stats["dsnot_swaps"] > 0
    assert e_after.sum() < e_before.sum()
    assert torch.isfinite(after.weight).all()


def test_regrown_take_dense_values_and_survivors_keep_solver_values():
    w, gram = _problem(seed=3)
    pattern = parse_pattern("unstructured")
    before = get_solver("sparsegpt").function()(w, gram, pattern, 0.7)
    after = refine(w, before, gram, pattern, 0.7)
    grown = after.mask & ~before.mask
    stayed = after.mask & before.mask
    assert grown.any()
    assert torch.equal(after.weight[grown], w[grown])
    assert torch.equal(after.weight[stayed], before.weight[stayed])


def test_unguarded_reference_variant_still_never_worsens_a_row():
    w, gram = _problem(seed=5)
    pattern = parse_pattern("unstructured:row")
    before = get_solver("wanda").function()(w, gram, pattern, 0.7)
    after = refine(w, before, gram, pattern, 0.7, guard=False, update_threshold=0.0)
    assert torch.all(_row_errors(w, after.weight, gram) <= _row_errors(w, before.weight, gram))
    assert torch.equal(before.mask.sum(1), after.mask.sum(1))


def test_zero_mean_inputs_and_block_patterns_are_left_alone():
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    gram = Gram(torch.eye(16) * 10, 10, torch.zeros(16))  # zero mean: no expected error to fix
    pattern = parse_pattern("unstructured")
    before = get_solver("magnitude").function()(w, gram, pattern, 0.5)
    after = refine(w, before, gram, pattern, 0.5)
    assert torch.equal(after.weight, before.weight)

    block = parse_pattern("block:4")
    res = get_solver("magnitude").function()(w, gram, block, 0.5)
    assert torch.equal(refine(w, res, gram, block, 0.5).weight, res.weight)


def test_options_validate():
    assert Options(max_cycles=10).max_cycles == 10
    with pytest.raises(Exception):
        Options(bogus=1)


def test_gram_without_mean_is_left_alone():
    w, gram = _problem(seed=9)
    bare = Gram(gram.matrix, gram.n_tokens)
    pattern = parse_pattern("unstructured")
    before = get_solver("wanda").function()(w, bare, pattern, 0.5)
    after = refine(w, before, bare, pattern, 0.5)
    assert torch.equal(after.weight, before.weight) and "dsnot" in after.stats
