import json

import pytest
import torch

from lmprune.registry import ALLOCATORS
from lmprune.allocation import (
    Allocation,
    MatrixInfo,
    check_weighted_mean,
    fit_weighted_mean,
    load_allocation_file,
)
from lmprune.allocation import alpha, owl, uniform
from lmprune.allocation.hill import _peak_candidates, eigenvalues, fit_power_law, matrix_alpha
from lmprune.allocation.plot import block_profile, plot_allocation


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small LAPACK calls are far slower with 2 threads on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pareto(n, a, xmin=2.0, seed=0):
    """Samples with density ∝ x^(-a) on [xmin, ∞)."""
    g = torch.Generator().manual_seed(seed)
    return xmin * torch.rand(n, generator=g, dtype=torch.float64).pow(-1.0 / (a - 1))


def spectral_matrix(out, inp, a, seed):
    """A matrix whose eigenvalues of WᵀW are Pareto(a) samples."""
    g = torch.Generator().manual_seed(seed)
    k = min(out, inp)
    u, _ = torch.linalg.qr(torch.randn(out, k, generator=g))
    v, _ = torch.linalg.qr(torch.randn(inp, k, generator=g))
    s = pareto(k, a, xmin=1e-2, seed=seed).sqrt().float()
    return u @ torch.diag(s) @ v.T


def weighted_mean(allocation):
    n = torch.tensor([m.params for m in allocation.matrices], dtype=torch.float64)
    t = torch.tensor([m.target for m in allocation.matrices], dtype=torch.float64)
    return float((n * t).sum() / n.sum())


# ---------------------------------------------------------------- Hill estimator

@pytest.mark.parametrize("rule", ["peak", "median"])
@pytest.mark.parametrize("a", [2.0, 3.0, 4.0, 5.0, 6.0])
def test_hill_recovers_pareto_exponent(a, rule):
    fit = fit_power_law(pareto(10_000, a, seed=0), rule)
    assert abs(fit.alpha - a) < 0.1
    assert fit.xmin >= 2.0 and fit.ks < 0.05


@pytest.mark.parametrize("a", [2.0, 4.0, 6.0])
def test_hill_exact_on_pareto_quantiles(a):
    n = 10_000
    u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    x = 2.0 * u.pow(-1.0 / (a - 1))
    assert abs(fit_power_law(x.flip(0), "peak").alpha - a) < 0.01  # order of the input does not matter


def test_peak_lower_bound_is_on_linear_scale():
    # a low bulk far below the mode: the reference's log-scale lower bound lets it in, the fixed rule does not
    bulk = torch.full((200,), 1e-3, dtype=torch.float64) * (1 + torch.arange(200) / 1000)
    mode = 1.0 + torch.arange(3000, dtype=torch.float64) / 30000
    eigs = torch.sort(torch.cat([bulk, mode, pareto(500, 3.0, xmin=1.2)])).values
    fixed = eigs[_peak_candidates(eigs, "peak", 100)]
    ref = eigs[_peak_candidates(eigs, "peak_reference", 100)]
    assert fixed.min() >= 0.95 * 1.0 - 1e-9 and fixed.max() <= 1.5 * 1.1
    assert ref.min() < 1e-2  # the quirk: everything below 1.5 x peak is a candidate
    assert fit_power_law(eigs, "peak").xmin >= 0.95


def test_eigenvalues_are_those_of_wtw():
    torch.manual_seed(0)
    w = torch.randn(12, 20, dtype=torch.float64)
    ref = torch.linalg.eigvalsh(w.T @ w)[-12:]
    assert torch.allclose(eigenvalues(w, torch.float64), ref, rtol=1e-9, atol=1e-9)
    assert eigenvalues(w.float()).dtype == torch.float32
    with pytest.raises(ValueError):
        eigenvalues(w, torch.float16)


def test_heavier_tail_gives_smaller_alpha():
    heavy = matrix_alpha(spectral_matrix(128, 192, 2.0, seed=1))
    light = matrix_alpha(spectral_matrix(128, 192, 6.0, seed=2))
    assert heavy.alpha < 3.0 < light.alpha


# ---------------------------------------------------------------- exact weighted mean

@pytest.mark.parametrize("target", [0.0, 0.3, 0.7, 0.9, 0.97, 0.99])
def test_fit_weighted_mean_scale_and_shift(target):
    torch.manual_seed(0)
    r = (torch.rand(50, dtype=torch.float64) * 1.6 + 0.2).tolist()
    n = torch.randint(100, 10_000, (50,)).tolist()
    for offset, slope in (([0.0] * 50, r), ([-x for x in r], [1.0] * 50)):
        s = torch.tensor(fit_weighted_mean(offset, slope, n, target, 0.0, 0.99), dtype=torch.float64)
        nn = torch.tensor(n, dtype=torch.float64)
        assert abs(float((s * nn).sum() / nn.sum()) - target) < 1e-12
        assert s.min() >= 0.0 and s.max() <= 0.99


def test_fit_weighted_mean_rejects_unreachable_target():
    with pytest.raises(ValueError):
        fit_weighted_mean([0.0, 0.0], [1.0, 1.0], [1, 1], 0.995, 0.0, 0.99)


def block_matrices(n_blocks=4, seed=0, tail=None):
    """Three matrices of different shapes per block (q-like, up-like, down-like)."""
    out = []
    for b in range(n_blocks):
        a = (tail or {}).get(b)
        for j, (o, i) in enumerate([(48, 48), (96, 48), (48, 96)]):
            s = seed + 10 * b + j
            if a is None:
                w = torch.randn(o, i, generator=torch.Generator().manual_seed(s)) / i**0.5
            else:
                w = spectral_matrix(o, i, a, s)
            out.append(MatrixInfo(f"model.layers.{b}.m{j}", b, w))
    return out


# ---------------------------------------------------------------- AlphaPruning

@pytest.mark.parametrize("target,epsilon", [(0.5, 0.3), (0.7, 0.2), (0.9, 0.9), (0.98, 0.5)])
@pytest.mark.parametrize("aggregate", ["block", "matrix", "block_median"])
def test_alpha_targets_in_range_and_exact_mean(target, epsilon, aggregate):
    mats = block_matrices(tail={0: 2.0, 1: 3.0, 2: 5.0})
    res = alpha.allocate(mats, target, epsilon=epsilon, aggregate=aggregate)
    assert abs(weighted_mean(res) - target) < 1e-6
    check_weighted_mean(res, target)
    assert all(0.0 <= m.target <= 0.99 for m in res.matrices)
    assert res.metric_name == "alpha" and all(m.metric > 1 for m in res.matrices)
    if aggregate != "matrix":
        assert len({m.target for m in res.matrices if m.block == 0}) == 1
    if target >= 0.9:  # η r would exceed 1 for the lightest tails: the clamp is active
        assert res.options["clamped"] > 0 and max(m.target for m in res.matrices) == pytest.approx(0.99)


def test_alpha_prunes_heavy_tails_less():
    mats = block_matrices(tail={0: 2.0, 1: 3.0, 2: 4.5, 3: 7.0})
    res = alpha.allocate(mats, 0.7, epsilon=0.2)
    prof = block_profile(res)
    metric = [prof[b][0] for b in range(4)]
    sparsity = [prof[b][1] for b in range(4)]
    assert metric == sorted(metric) and sparsity == sorted(sparsity)
    assert sparsity[0] < 0.7 < sparsity[3]
    # no clamping: the reference's closed form η = S Σn / Σ n r
    r = torch.tensor(alpha.alpha_ratios([res.options["block_alpha"][str(m.block)] for m in mats], 0.2), dtype=torch.float64)
    n = torch.tensor([m.params for m in mats], dtype=torch.float64)
    eta = 0.7 * n.sum() / (n * r).sum()
    assert torch.allclose(torch.tensor([m.target for m in res.matrices], dtype=torch.float64), eta * r)


def test_alpha_block_median_ignores_one_extreme_matrix():
    mats = block_matrices(tail={0: 2.0, 1: 2.0, 2: 2.0, 3: 2.0})
    mats[4] = MatrixInfo(mats[4].name, 1, spectral_matrix(96, 48, 12.0, 99))  # one light-tailed matrix in block 1
    mean = block_profile(alpha.allocate(mats, 0.7, epsilon=0.3))
    median = block_profile(alpha.allocate(mats, 0.7, epsilon=0.3, aggregate="block_median"))
    assert mean[1][1] == max(p[1] for p in mean.values())  # the mean sends block 1 to the top
    assert median[1][1] < mean[1][1]


def test_alpha_cache_roundtrip(tmp_path):
    mats = block_matrices(n_blocks=2)
    first = alpha.allocate(mats, 0.6, cache_dir=tmp_path, model_hash="tiny")
    assert first.options["computed"] == len(mats)
    data = json.loads((tmp_path / "alpha-tiny.json").read_text())
    assert set(data["fits"]["peak/float32"]) == {m.name for m in mats}
    second = alpha.allocate(mats, 0.6, cache_dir=tmp_path, model_hash="tiny")
    assert second.options["computed"] == 0 and second.targets == first.targets
    # a different rule is a different cache entry; an unnamed model is keyed by its weights' hash
    assert alpha.allocate(mats, 0.6, xmin_rule="median", cache_dir=tmp_path, model_hash="tiny").options["computed"] == 6
    alpha.allocate(mats, 0.6, cache_dir=tmp_path)
    assert (tmp_path / f"alpha-{alpha.weights_hash(mats)}.json").exists()


def test_alpha_rejects_bad_arguments():
    mats = block_matrices(n_blocks=2)
    with pytest.raises(ValueError):
        alpha.allocate(mats, 0.7, epsilon=1.0)
    with pytest.raises(ValueError):
        alpha.allocate(mats, 0.7, aggregate="layer")
    with pytest.raises(ValueError):
        alpha.allocate(mats, 0.995)


# ---------------------------------------------------------------- OWL

def owl_inputs(outlier_block=2, n_blocks=4):
    mats = block_matrices(n_blocks=n_blocks)
    norms = {}
    g = torch.Generator().manual_seed(7)
    for m in mats:
        x = torch.rand(m.weight.shape[1], generator=g) + 0.5
        if m.block == outlier_block:
            x[:4] *= 40.0  # a few massive input features, as in real LLM activations
        norms[m.name] = x
    return mats, norms


def test_owl_gives_outlier_block_less_sparsity():
    mats, norms = owl_inputs(outlier_block=2)
    res = owl.allocate(mats, norms, 0.7)
    prof = block_profile(res)
    assert res.options["block_outlier_ratio"]["2"] == max(res.options["block_outlier_ratio"].values())
    assert prof[2][1] == min(p[1] for p in prof.values())
    assert prof[2][1] < 0.7
    spread = max(p[1] for p in prof.values()) - min(p[1] for p in prof.values())
    assert spread == pytest.approx(2 * 0.08)
    assert abs(weighted_mean(res) - 0.7) < 1e-6
    assert all(m.metric == res.options["block_outlier_ratio"][str(m.block)] for m in res.matrices)


def test_owl_outlier_ratio_definition():
    w = torch.ones(2, 10)
    w[0, 0] = 100.0
    m = MatrixInfo("x", 0, w)
    # scores: one 100 among 19 ones; mean = 119/20 = 5.95; > 5 x mean: only the 100
    assert owl.outlier_ratios([m], {"x": torch.ones(10)}, M=5.0) == {0: 100.0 / 20}


@pytest.mark.parametrize("target,lam", [(0.5, 0.08), (0.9, 0.08), (0.95, 0.2), (0.05, 0.2)])
def test_owl_exact_mean_with_clamping(target, lam):
    mats, norms = owl_inputs()
    res = owl.allocate(mats, norms, target, lam=lam)
    assert abs(weighted_mean(res) - target) < 1e-6
    assert all(0.0 <= m.target <= 0.99 for m in res.matrices)
    if target in (0.95, 0.05):
        assert res.options["clamped"] > 0


def test_owl_needs_norms_for_every_matrix():
    mats, norms = owl_inputs()
    norms.pop(mats[0].name)
    with pytest.raises(KeyError):
        owl.allocate(mats, norms, 0.7)


# ---------------------------------------------------------------- uniform, files, plot

def test_uniform_and_registry():
    mats = block_matrices(n_blocks=2)
    res = uniform.allocate(mats, 0.6)
    assert {m.target for m in res.matrices} == {0.6}
    check_weighted_mean(res, 0.6)
    assert set(ALLOCATORS) == {"uniform", "owl", "alpha"}
    assert "input_norms" in ALLOCATORS["owl"].needs and "input_norms" not in ALLOCATORS["alpha"].needs


def test_json_roundtrip_and_file_validation(tmp_path):
    mats = block_matrices(n_blocks=3, tail={0: 2.0})
    res = alpha.allocate(mats, 0.7)
    path = tmp_path / "alloc.json"
    res.to_json(path)
    back = load_allocation_file(path, [m.name for m in mats])
    assert back.targets == res.targets and back.options == res.options
    assert [m.metric for m in back.matrices] == [m.metric for m in res.matrices]
    check_weighted_mean(back, 0.7)

    with pytest.raises(ValueError, match="missing"):
        load_allocation_file(path, [m.name for m in mats] + ["model.layers.9.extra"])
    with pytest.raises(ValueError, match="unknown"):
        load_allocation_file(path, [m.name for m in mats[1:]])
    data = json.loads(path.read_text())
    data["matrices"][0]["target"] = 1.0
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"out of \[0,1\)"):
        load_allocation_file(path, [m.name for m in mats])
    path.write_text("{not json")
    with pytest.raises(ValueError):
        load_allocation_file(path, [m.name for m in mats])


def test_check_weighted_mean_raises():
    res = Allocation.from_dict(
        {"method": "x", "sparsity": 0.5, "matrices": [{"name": "a", "block": 0, "params": 10, "target": 0.4}]}
    )
    with pytest.raises(ValueError):
        check_weighted_mean(res, 0.5)


def test_plot_written(tmp_path):
    mats, norms = owl_inputs()
    for res in (owl.allocate(mats, norms, 0.7), alpha.allocate(mats, 0.7, aggregate="matrix"),
                uniform.allocate(mats, 0.7)):
        path = plot_allocation(res, tmp_path / f"{res.method}.png")
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


# ---------------------------------------------------------------- every allocator with every solver, tiny model

@pytest.mark.parametrize("allocation", ["uniform", "owl", "alpha"])
def test_allocators_drive_every_solver_on_a_tiny_model(allocation, calib_file, tokenizer, tmp_path):
    from conftest import make_model

    from lmprune.api import prune
    from lmprune.config import build_config, method_names
    from lmprune.solvers import SOLVERS

    options = {"epsilon": 0.3} if allocation == "alpha" else {"lam": 0.1} if allocation == "owl" else {}
    saved = None
    for method in list(SOLVERS) + [m for m in method_names() if m not in SOLVERS]:  # + block methods (SparseLLM)
        model = make_model("llama", seed=1)
        config = build_config(method=method, sparsity=0.6, allocation=allocation, allocation_options=options,
                              calib=str(calib_file), nsamples=2, seqlen=32, seed=0)
        run = prune(model, tokenizer, config, progress=False)
        targets = {m["name"]: m["target"] for m in run["allocation_detail"]["matrices"]}
        assert abs(run["allocation_detail"]["weighted_mean_sparsity"] - 0.6) < 1e-6
        assert {r["name"] for r in run["layers"]} == set(targets)
        for r in run["layers"]:  # each solver met its matrix's own target (per-row rounding at most)
            assert abs(r["sparsity"] - targets[r["name"]]) < 0.02, (method, r["name"])
        assert abs(run["achieved_sparsity"] - 0.6) < 0.01
        if allocation != "uniform":
            assert len(set(targets.values())) > 1
        saved = saved or Allocation.from_dict(run["allocation_detail"])

    # the saved allocation feeds another run as FILE.json
    path = tmp_path / "alloc.json"
    saved.to_json(path)
    config = build_config(method="magnitude", sparsity=0.6, allocation=str(path), calib=str(calib_file),
                          nsamples=2, seqlen=32)
    run = prune(make_model("llama", seed=1), tokenizer, config, progress=False)
    assert {r["name"]: r["target"] for r in run["layers"]} == saved.targets
