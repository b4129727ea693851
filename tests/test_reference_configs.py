"""Issue 21: the papers' configurations one option away, checked against re-typed reference updates.

The reference updates below are written from the equations in ``shared/notes/methods.md`` (SparseLLM §2.2-2.3,
AlphaPruning's ESD fit), in float64, independently of ``lmprune.solvers.sparsellm``: the W-update is the exact
least-squares solution (``pinv``), the p-, z- and s-updates are the closed forms and the two gradient steps of the
authors' code, and the result is the last round's pruned weights. The inner pruner is the same SparseGPT call on
both sides, so what is compared is the outer algorithm.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import make_model
from lmprune import api, pipeline
from lmprune.registry import SOLVERS
from lmprune.config import ConfigError, build_config
from lmprune.patterns import parse_pattern
from lmprune.solvers import Gram, get_solver
from lmprune.solvers.sparsellm import Options, FFNData, prune_ffn_relu, prune_ffn_swiglu
from lmprune.strategies.sparsellm import StrategyOptions

T, D, DFF = 2048, 16, 48
PAPER_SOLVER = {k: v for k, v in Options(preset="paper").model_dump().items() if k != "preset"}


def _inner(pattern):
    fn = get_solver("sparsegpt").function()
    return lambda w, gram, target: fn(w.float(), gram, pattern, target)


def _data(seed, swiglu):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=torch.float64) @ (torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5)
    up = torch.randn(DFF, D, generator=g, dtype=torch.float64) / D**0.5
    gate = torch.randn(DFF, D, generator=g, dtype=torch.float64) / D**0.5
    down = torch.randn(D, DFF, generator=g, dtype=torch.float64) / DFF**0.5
    b1 = 0.1 * torch.randn(DFF, generator=g, dtype=torch.float64)
    b2 = 0.1 * torch.randn(D, generator=g, dtype=torch.float64)
    if swiglu:
        y = (F.silu(x @ gate.T) * (x @ up.T)) @ down.T
        return x, y, {"up": up, "gate": gate, "down": down}
    y = torch.relu(x @ up.T + b1) @ down.T + b2
    return x, y, {"fc1": up, "b1": b1, "fc2": down, "b2": b2}


def _prune_ref(w, inputs, target, inner):
    """The reference's prune step: SparseGPT with H from the layer's current input."""
    gram = Gram((inputs.T @ inputs).float(), inputs.shape[0])
    return inner(w.float(), gram, target).weight.double()


def reference_relu(x, y, w, target, rounds, inner, a=0.1, b=0.1, g=0.1):
    """SparseLLM for fc1 → ReLU → fc2 as the reference runs it (biases fixed); returns the last round's weights."""
    b1, b2 = w["b1"], w["b2"]
    z = x @ w["fc1"].T + b1
    p = torch.relu(z)
    w1, w2 = w["fc1"], w["fc2"]
    for r in range(rounds):
        if r > 0:  # W-update: dense least squares against the auxiliaries, then prune
            w1 = (torch.linalg.pinv(x) @ (z - b1)).T
            w2 = (torch.linalg.pinv(p) @ (y - b2)).T
        w1 = _prune_ref(w1, x, target, inner)
        w2 = _prune_ref(w2, p, target, inner)
        # p-update, then the ReLU z-update from the two branch minimisers
        a_mat = b * w2.T @ w2 + g * torch.eye(w2.shape[1], dtype=torch.float64)
        p = torch.linalg.solve(a_mat, (b * (y - b2) @ w2 + g * torch.relu(z)).T).T
        m = x @ w1.T + b1
        zp = ((g * p + a * m) / (g + a)).clamp_min(0)
        zn = m.clamp_max(0)
        cost_p = g * (p - torch.relu(zp)) ** 2 + a * (zp - m) ** 2
        cost_n = g * (p - torch.relu(zn)) ** 2 + a * (zn - m) ** 2
        z = torch.where(cost_p <= cost_n, zp, zn)
    return {"fc1": w1, "fc2": w2}


def reference_swiglu(x, y, w, target, rounds, inner, a=5.0, b=5.0, g=5.0, lr=0.01, epochs=2):
    """SparseLLM for down(SiLU(gate x) ⊙ up x) as the reference runs it; returns the last round's weights."""
    z, s = x @ w["up"].T, x @ w["gate"].T
    p = F.silu(s) * z
    wu, wg, wd = w["up"], w["gate"], w["down"]
    for r in range(rounds):
        if r > 0:
            xp = torch.linalg.pinv(x)
            wu, wg = (xp @ z).T, (xp @ s).T
            wd = (torch.linalg.pinv(p) @ y).T
        wu = _prune_ref(wu, x, target, inner)
        wg = _prune_ref(wg, x, target, inner)
        wd = _prune_ref(wd, p, target, inner)
        sig = F.silu(s)
        a_mat = b * wd.T @ wd + g * torch.eye(wd.shape[1], dtype=torch.float64)
        p = torch.linalg.solve(a_mat, (b * y @ wd + g * sig * z).T).T
        m, n = x @ wu.T, x @ wg.T
        z = (a * m + g * sig * p) / (a + g * sig**2)  # = (m + σp)/(σ² + 1) at α = γ, the reference's form
        for _ in range(epochs):  # one gradient step per element and epoch on α(s−n)² + γ(p − SiLU(s)z)²
            ss = s.clone().requires_grad_(True)
            loss = a * ((ss - n) ** 2).sum() + g * ((p - F.silu(ss) * z) ** 2).sum()
            (grad,) = torch.autograd.grad(loss, ss)
            s = (ss - lr * grad).detach()
    return {"up": wu, "gate": wg, "down": wd}


def _ffn_err(x, y, w, swiglu):
    if swiglu:
        out = (F.silu(x @ w["gate"].T) * (x @ w["up"].T)) @ w["down"].T
    else:
        out = torch.relu(x @ w["fc1"].T + w["b1"]) @ w["fc2"].T + w["b2"]
    return float(((y - out) ** 2).sum() / (y**2).sum())


# percdamp ~ 0: the reference's W-update is undamped least squares; with T >> d the damped float64 Cholesky
# solve and pinv agree, so any difference left comes from the updates.
EXACT_LS = {"percdamp": 1e-12}
# the reference's s-update; the preset keeps lmprune's Gauss-Newton steps (the gradient steps diverge on large z)
GRADIENT_S = {"s_update": "gradient", "s_steps": 2, "s_lr": 0.01}


@pytest.mark.parametrize("rounds", [1, 4])
def test_paper_preset_relu_reproduces_the_reference(rounds):
    pattern = parse_pattern("unstructured")
    x, y, w = _data(0, swiglu=False)
    inner = _inner(pattern)
    ref = reference_relu(x, y, w, 0.7, rounds, inner)
    opts = {**PAPER_SOLVER, **EXACT_LS, "rounds": rounds, "alpha": 0.1, "beta": 0.1, "gamma": 0.1}  # OPT's values
    out = prune_ffn_relu(FFNData.relu(x.float(), y.float(), w["fc1"].float(), w["b1"].float(), w["fc2"].float(), w["b2"].float()), pattern, {"fc1": 0.7, "fc2": 0.7}, inner, **opts)
    got = {k: out.results[k].weight.double() for k in ("fc1", "fc2")}
    for k in got:
        assert torch.equal(got[k] != 0, ref[k] != 0), k
        assert torch.allclose(got[k], ref[k], rtol=1e-4, atol=1e-5), (k, float((got[k] - ref[k]).abs().max()))
    e_ref, e_got = _ffn_err(x, y, {**w, **ref}, False), _ffn_err(x, y, {**w, **got}, False)
    assert e_got == pytest.approx(e_ref, rel=1e-4)
    assert out.stats["best_round"] == rounds - 1


@pytest.mark.parametrize("rounds", [1, 4])
def test_paper_preset_swiglu_reproduces_the_reference(rounds):
    pattern = parse_pattern("unstructured")
    x, y, w = _data(1, swiglu=True)
    inner = _inner(pattern)
    ref = reference_swiglu(x, y, w, 0.7, rounds, inner)
    opts = {**PAPER_SOLVER, **EXACT_LS, "rounds": rounds, **GRADIENT_S}
    out = prune_ffn_swiglu(FFNData.swiglu(x.float(), y.float(), w["up"].float(), w["gate"].float(), w["down"].float()), pattern, 0.7, inner, **opts)
    got = {k: out.results[k].weight.double() for k in ("up", "gate", "down")}
    for k in got:
        agree = float((got[k] != 0).eq(ref[k] != 0).double().mean())
        assert agree > 0.995, (k, agree)  # float32 vs float64 auxiliaries may flip a near-tie
    e_ref, e_got = _ffn_err(x, y, ref, True), _ffn_err(x, y, got, True)
    assert e_got == pytest.approx(e_ref, rel=2e-3)


def test_one_round_is_layerwise_sparsegpt_without_the_down_refit():
    """One reference round is SparseGPT on each FFN matrix from its dense weights and dense activations."""
    pattern = parse_pattern("unstructured")
    x, y, w = _data(2, swiglu=True)
    inner = _inner(pattern)
    out = prune_ffn_swiglu(FFNData.swiglu(x.float(), y.float(), w["up"].float(), w["gate"].float(), w["down"].float()), pattern, 0.7, inner, **{**PAPER_SOLVER, "rounds": 1})
    p = F.silu(x @ w["gate"].T) * (x @ w["up"].T)
    for got, want in ((out.results["down"].weight.double(), _prune_ref(w["down"], p, 0.7, inner)),
                      (out.results["up"].weight.double(), _prune_ref(w["up"], x, 0.7, inner))):
        assert torch.equal(got != 0, want != 0)
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)


def test_equal_penalties_improve_on_round_zero_without_the_down_refit():
    """The old docstring said α = β = γ never beat round 0; they do once the down refit is off."""
    pattern = parse_pattern("unstructured")
    x, y, w = _data(3, swiglu=True)
    args = (FFNData.swiglu(x.float(), y.float(), w["up"].float(), w["gate"].float(), w["down"].float()), pattern, 0.7,
            _inner(pattern))
    out = prune_ffn_swiglu(*args, alpha=1.0, beta=1.0, gamma=1.0, rounds=4, refit_down=False)
    errs = out.stats["ffn_error"]
    assert min(errs[1:]) < errs[0]
    assert out.stats["best_round"] != 0


def test_penalty_scale_does_not_matter_outside_the_gradient_s_step():
    pattern = parse_pattern("unstructured")
    x, y, w = _data(4, swiglu=False)
    args = (FFNData.relu(x.float(), y.float(), w["fc1"].float(), w["b1"].float(), w["fc2"].float(), w["b2"].float()),
            pattern, 0.7, _inner(pattern))
    a = prune_ffn_relu(*args, **{**PAPER_SOLVER, "alpha": 5.0, "beta": 5.0, "gamma": 5.0})
    b = prune_ffn_relu(*args, **{**PAPER_SOLVER, "alpha": 0.1, "beta": 0.1, "gamma": 0.1})
    assert a.stats["final_ffn_error"] == pytest.approx(b.stats["final_ffn_error"], rel=1e-4)


@pytest.mark.parametrize("bad", [{"gamma": 0}, {"alpha": 0.0}, {"beta": -1}, {"gamma": float("inf")},
                                 {"rounds": 0}, {"preset": "reference"}, {"select": "first"},
                                 {"s_update": "adam"}, {"single_round_blocks": "all"}])
def test_values_the_updates_cannot_take_are_refused_in_one_line(bad):
    with pytest.raises(ConfigError) as err:
        build_config(method="sparsellm", method_options=bad)  # refused when the configuration is built
    assert "\n" not in str(err.value) and "method_options for sparsellm" in str(err.value)


def test_direct_calls_refuse_zero_gamma():
    pattern = parse_pattern("unstructured")
    x, y, w = _data(0, swiglu=True)
    with pytest.raises(ValueError, match="gamma"):
        prune_ffn_swiglu(FFNData.swiglu(x.float(), y.float(), w["up"].float(), w["gate"].float(), w["down"].float()), pattern, 0.5, _inner(pattern), gamma=0.0)


def test_paper_preset_resolves_and_explicit_options_win():
    opts = StrategyOptions(preset="paper", rounds=8)
    assert opts.rounds == 8 and not opts.refit_down and opts.select == "last" and not opts.keep_better
    assert (opts.alpha, opts.beta, opts.gamma) == (5.0, 5.0, 5.0)
    assert opts.sequential_attention is False and opts.single_round_blocks == "reference"
    default = StrategyOptions()
    assert default.refit_down and default.select == "best" and default.gamma == 10.0 and default.preset is None


def test_paper_preset_through_the_api_records_it_and_runs_single_round_blocks(tokenizer, calib_file):
    model = make_model("llama")
    config = build_config(method="sparsellm", sparsity=0.6, calib=str(calib_file), nsamples=2, seqlen=24,
                          method_options={"preset": "paper", "rounds": 2, "single_round_blocks": [1]})
    report = api.prune(model, tokenizer, config, progress=False)
    resolved = report["resolved_options"]["method_options"]
    assert resolved["preset"] == "paper" and resolved["refit_down"] is False and resolved["select"] == "last"
    assert report["configuration"] == "sparsellm-paper(sparsegpt, rounds 2, single-round blocks [1])"
    ffn = [r for r in report["layers"] if r["name"].endswith(("up_proj", "down_proj"))]
    for rec in ffn:
        assert rec["stats"]["sparsellm_rounds_run"] == (1 if rec["block"] == 1 else 2)
    json.dumps(report["configuration"])


# ---------------------------------------------------------------- AlphaPruning: xmin_rule=peak_reference

def reference_alpha_peak(eigs):
    """net_esd_estimator's ``alpha_peak`` as the notes restate it: 100-bin histogram of log10 λ, p = 10^(left edge
    of the fullest bin); candidate xmins λ_i (the last eigenvalue excluded) with λ_i ≤ 1.5p and λ_i ≥ log10(0.95p)
    (the reference's log-against-linear bound); Hill α and the KS distance per candidate, KS only where α > 1;
    the first minimum of KS. Plain loops in float64."""
    e = torch.sort(eigs.double()).values
    n_all = e.numel()
    log10 = e.log10()
    counts = torch.histc(log10, bins=100, min=float(log10[0]), max=float(log10[-1]))
    width = float(log10[-1] - log10[0]) / 100
    peak = 10 ** (float(log10[0]) + int(torch.argmax(counts)) * width)
    best = (math.inf, None, None)
    for i in range(n_all - 1):
        xmin = float(e[i])
        if not (xmin <= 1.5 * peak and xmin >= math.log10(0.95 * peak)):
            continue
        tail = e[i:]
        n = tail.numel()
        a = 1 + n / float(torch.log(tail / xmin).sum())
        if not a > 1:
            continue
        q = torch.arange(n, dtype=torch.float64)
        ks = float((1 - (tail / xmin) ** (1 - a) - q / n).abs().max())
        if ks < best[0]:
            best = (ks, a, xmin)
    return best[1], best[2]


def _known_xmin_spectrum(a=3.0, xmin=1.0, n_tail=2000, n_bulk=300):
    """Exact Pareto(a) quantiles from ``xmin`` up, above a log-uniform bulk from 1e-3 to 0.5 that only the
    reference's log-scale lower bound admits as candidates."""
    u = (torch.arange(n_tail, dtype=torch.float64) + 0.5) / n_tail
    tail = xmin * u.pow(-1.0 / (a - 1))
    bulk = torch.logspace(-3, math.log10(0.5), n_bulk, dtype=torch.float64)
    return torch.cat([bulk, tail])


def test_peak_reference_alpha_equals_the_retyped_reference_on_a_known_spectrum():
    from lmprune.allocation.hill import fit_power_law

    eigs = _known_xmin_spectrum()
    want_alpha, want_xmin = reference_alpha_peak(eigs)
    fit = fit_power_law(eigs, "peak_reference", max_candidates=None)
    assert fit.alpha == pytest.approx(want_alpha, rel=1e-9) and fit.xmin == want_xmin
    # the known tail: x_min = 1 and α = 3 are recovered
    assert want_xmin == pytest.approx(1.0, rel=0.01) and want_alpha == pytest.approx(3.0, abs=0.05)
    # lmprune's default rule has the bulk out of its candidate set and finds the same tail here
    peak = fit_power_law(eigs, "peak", max_candidates=None)
    assert peak.xmin == pytest.approx(1.0, rel=0.01)


def test_peak_reference_equals_the_retyped_reference_with_a_wide_low_bulk():
    """Thousands of extra candidates below 0.95p that only the reference's rule admits."""
    from lmprune.allocation.hill import fit_power_law

    g = torch.Generator().manual_seed(0)
    bulk = 0.2 + 0.6 * torch.rand(3000, generator=g, dtype=torch.float64)  # a wide low bulk …
    mode = 1.0 + 0.01 * torch.rand(4000, generator=g, dtype=torch.float64)  # … a narrow mode …
    tail = 1.0 * ((torch.arange(400, dtype=torch.float64) + 0.5) / 400).pow(-1.0 / 1.5)  # … and a heavy tail
    eigs = torch.cat([bulk, mode, tail])
    want_alpha, want_xmin = reference_alpha_peak(eigs)
    ref = fit_power_law(eigs, "peak_reference", max_candidates=None)
    assert ref.alpha == pytest.approx(want_alpha, rel=1e-9) and ref.xmin == want_xmin


def test_alpha_allocation_with_peak_reference_is_the_reference_mapping():
    """Block-mean α, r = 1 − ε + 2ε(q − min q)/(max q − min q), s = η r with η from the parameter-weighted mean
    (no clamping needed at these targets): the reference's ww_sparsity, on α from the re-typed fit."""
    from lmprune.allocation import MatrixInfo, alpha

    g = torch.Generator().manual_seed(5)
    mats = []
    for b in range(3):
        for j, (o, i) in enumerate([(24, 16), (16, 24)]):
            k = min(o, i)
            u, _ = torch.linalg.qr(torch.randn(o, k, generator=g, dtype=torch.float64))
            v, _ = torch.linalg.qr(torch.randn(i, k, generator=g, dtype=torch.float64))
            s = (0.05 * torch.rand(k, generator=g, dtype=torch.float64).pow(-1.0 / (1.5 + b))).sqrt()
            mats.append(MatrixInfo(f"b{b}.m{j}", b, (u @ torch.diag(s) @ v.T).float()))
    got = alpha.allocate(mats, 0.6, epsilon=0.3, xmin_rule="peak_reference", dtype=torch.float64)
    a = [reference_alpha_peak(torch.linalg.svdvals(m.weight.double()).pow(2))[0] for m in mats]
    block = {b: sum(x for x, m in zip(a, mats) if m.block == b) / 2 for b in range(3)}
    q = torch.tensor([block[m.block] for m in mats], dtype=torch.float64)
    r = (q - q.min()) / (q.max() - q.min()) * 0.6 + 0.7
    n = torch.tensor([m.weight.numel() for m in mats], dtype=torch.float64)
    want = 0.6 * n.sum() / (n * r).sum() * r
    assert float(want.max()) < 0.99
    for m, w, am in zip(got.matrices, want.tolist(), a):
        assert m.metric == pytest.approx(am, rel=1e-6)
        assert m.target == pytest.approx(w, abs=1e-9)


# ---------------------------------------------------------------- configuration labels

def _manifest(method="sparsegpt", **config):
    base = {"method": method, "inner": "sparsegpt", "refine": "none", "allocation": "uniform",
            "method_options": {}, "solver_options": {}, "allocation_options": {}, "refine_options": {}}
    base.update(config)
    settings = pipeline.resolved_settings(build_config(**{k: v for k, v in {**base, "method": method}.items()}))
    return {"method": method, "allocation": base["allocation"], "config": base, "resolved_options": settings}


@pytest.mark.parametrize("fields,label", [
    ({"method": "sparsellm"}, "sparsellm(sparsegpt, +down refit, +best round)"),
    ({"method": "sparsellm", "method_options": {"preset": "paper"}}, "sparsellm-paper(sparsegpt)"),
    ({"method": "sparsellm", "inner": "alps", "method_options": {"preset": "paper", "gamma": 10.0}},
     "sparsellm-paper(alps, γ 10)"),
    ({"method": "sparsellm", "method_options": {"refit_down": False}}, "sparsellm(sparsegpt, +best round)"),
    ({"method": "wanda", "allocation": "alpha", "allocation_options": {"xmin_rule": "peak_reference"}},
     "wanda + alpha(peak_reference)"),
    ({"method": "sparsegpt", "allocation": "alpha"}, "sparsegpt + alpha(peak)"),
    ({"method": "sparsegpt", "allocation": "alpha", "allocation_options": {"epsilon": 0.2}},
     "sparsegpt + alpha(peak, ε 0.2)"),
    ({"method": "alps", "solver_options": {"pcg_iters": 10}}, "alps(pcg 10)"),
    ({"method": "alps-paper"}, "alps-paper"),
    ({"method": "alps-fast"}, "alps-fast"),
    ({"method": "wanda", "refine": "dsnot"}, "wanda+dsnot"),
    ({"method": "sparsegpt", "allocation": "owl"}, "sparsegpt + owl"),
])
def test_configuration_label(fields, label):
    from lmprune.report.labels import configuration_label

    method = fields.pop("method")
    assert configuration_label(_manifest(method, **fields)) == label


def test_label_of_an_older_manifest_without_the_new_options():
    """Issue 4's manifests resolved SparseLLM without preset/select/keep_better/s_update: today's defaults."""
    from lmprune.report.labels import configuration_label

    old = {"alpha": 1.0, "beta": 1.0, "gamma": 10.0, "rounds": 4, "s_steps": 3, "percdamp": 0.01,
           "chunk_tokens": 4096, "refit_down": True, "sequential_attention": True}
    manifest = {"method": "sparsellm", "allocation": "uniform", "config": {"inner": "alps", "refine": "none"},
                "resolved_options": {"solver": "alps", "solver_options": {}, "refiner": "none", "method_options": old}}
    assert configuration_label(manifest) == "sparsellm(alps, +down refit, +best round)"


def test_alps_paper_preset_runs_ten_pcg_steps():
    assert SOLVERS.options("alps-paper").pcg_iters == 10
    assert SOLVERS.options("alps").pcg_iters == 3


def test_gradient_s_step_diverges_where_gauss_newton_does_not():
    """Why the preset keeps Gauss-Newton: with z large, lr·γ·(SiLU'(s)z)² > 1 and the fixed-step update
    overshoots further each step; the safeguarded Gauss-Newton step only ever lowers each element's term."""
    from lmprune.solvers.sparsellm import _s_gradient, _s_steps

    g = torch.Generator().manual_seed(0)
    n = torch.randn(1000, generator=g)
    z = 30 * torch.randn(1000, generator=g)
    p = F.silu(n + 0.5) * z
    s0 = n.clone()

    def f(s):
        return float((5 * (s - n) ** 2 + 5 * (p - F.silu(s) * z) ** 2).sum())

    assert f(_s_gradient(s0, n, z, p, 5.0, 5.0, 2, 0.01)) > 10 * f(s0)
    assert f(_s_steps(s0, n, z, p, 5.0, 5.0, 2)) < f(s0)
