import pytest
import torch

from lmprune.patterns import _keep_top_k, parse_pattern
from lmprune.solvers import SOLVERS, alps, sparsegpt
from lmprune.solvers.base import Gram, reconstruction_error
from lmprune.solvers.pcg import masked_pcg

PATTERNS = ["unstructured", "unstructured:row", "2:4", "block:4", "row"]


@pytest.fixture(autouse=True)
def one_thread():
    """Small problems: a second thread only adds synchronisation stalls on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def planted(out=32, inp=64, tokens=512, seed=0):
    """Correlated inputs (a random mixing of Gaussian factors plus a few large features) and a dense weight."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(tokens, inp, generator=g)
    mix = torch.eye(inp) + 0.6 * torch.randn(inp, inp, generator=g) / inp**0.5
    x = z @ mix
    x[:, :4] *= 5.0
    w = torch.randn(out, inp, generator=g)
    return w, Gram.from_inputs(x)


def test_keep_top_k_bracketed_is_exact_with_ties():
    torch.manual_seed(0)
    n = 300_000
    for scores in (torch.randn(1, n).abs(), (torch.randn(1, n) * 3).round().abs()):
        for k in (1, 1000, n // 3, n // 2, n - 5):
            m = _keep_top_k(scores, k)
            assert int(m.sum()) == k
            assert scores[m].min() >= scores[~m].max()


@pytest.mark.parametrize("spec", PATTERNS)
def test_projection_is_exact_in_weight_layout(spec):
    torch.manual_seed(1)
    pattern = parse_pattern(spec)
    b = torch.randn(64, 32)  # ALPS layout: in x out
    keep = alps.keep_mask_scaled(pattern, b, 0.5)
    assert keep.shape == b.shape
    assert torch.equal(keep, pattern.keep_mask(b.abs().T, 0.5).T)
    assert pattern.verify((b * keep).T, 0.5).ok
    w = b.T
    if spec == "unstructured":
        k = keep.sum()
        assert k == 32 * 64 // 2 and b.abs()[keep].min() >= b.abs()[~keep].max()
    elif spec == "unstructured:row":  # per output row of W = per column of B
        for j in range(32):
            col = b[:, j].abs()
            assert keep[:, j].sum() == 32 and col[keep[:, j]].min() >= col[~keep[:, j]].max()
    elif spec == "2:4":
        groups = w.abs().reshape(32, 16, 4)
        kept = keep.T.reshape(32, 16, 4)
        assert (kept.sum(-1) == 2).all()
        assert (groups.masked_fill(~kept, float("inf")).amin(-1) >= groups.masked_fill(kept, -1).amax(-1)).all()
    elif spec == "block:4":
        energy = w.pow(2).reshape(8, 4, 16, 4).sum((1, 3))
        tiles = keep.T.reshape(8, 4, 16, 4)[:, 0, :, 0]
        assert (keep.T.reshape(8, 4, 16, 4) == tiles[:, None, :, None]).all()
        assert tiles.sum() == 64 and energy[tiles].min() >= energy[~tiles].max()
    else:  # whole input channels = rows of B
        rows = keep.any(1)
        assert (keep[rows]).all() and rows.sum() == 32
        energy = b.pow(2).sum(1)
        assert energy[rows].min() >= energy[~rows].max()


def test_nm_rank_projection_keeps_exactly_n_with_ties():
    torch.manual_seed(11)
    b = (torch.randn(64, 24) * 2).round()  # many ties
    for n, m in ((2, 4), (1, 4), (4, 8), (3, 8)):
        keep = alps.keep_mask_scaled(parse_pattern(f"{n}:{m}"), b, 1 - n / m)
        groups = b.abs().T.reshape(24, 64 // m, m)
        kept = keep.T.reshape(24, 64 // m, m)
        assert (kept.sum(-1) == n).all()
        assert (groups.masked_fill(~kept, float("inf")).amin(-1) >= groups.masked_fill(kept, -1).amax(-1)).all()


def test_masked_pcg_matches_exact_solve_per_column():
    torch.manual_seed(2)
    n, c = 40, 12
    a = torch.randn(n, n, dtype=torch.float64)
    h = a @ a.T / n + 0.5 * torch.eye(n, dtype=torch.float64)
    g = torch.randn(n, c, dtype=torch.float64)
    mask = torch.rand(n, c) < 0.5
    res = masked_pcg(h, g, mask, iters=n)
    assert (res.x[~mask] == 0).all()
    for j in range(c):
        s = mask[:, j]
        exact = torch.linalg.solve(h[s][:, s], g[s, j])
        assert torch.linalg.norm(res.x[s, j] - exact) / torch.linalg.norm(exact) < 1e-4


def test_masked_pcg_with_jacobi_preconditioner_and_monotone_objective():
    torch.manual_seed(3)
    n, c = 30, 5
    a = torch.randn(n, n, dtype=torch.float64)
    scale = torch.logspace(-1, 1, n, dtype=torch.float64)
    h = scale[:, None] * (a @ a.T / n + torch.eye(n, dtype=torch.float64)) * scale[None, :]
    g = torch.randn(n, c, dtype=torch.float64)
    mask = torch.rand(n, c) < 0.6
    res = masked_pcg(h, g, mask, iters=n, inv_diag=1 / torch.diagonal(h))
    for j in range(c):
        s = mask[:, j]
        exact = torch.linalg.solve(h[s][:, s], g[s, j])
        assert torch.linalg.norm(res.x[s, j] - exact) / torch.linalg.norm(exact) < 1e-4
    obj = torch.tensor(res.objective)
    assert (obj[1:] <= obj[:-1] + 1e-9 * obj.abs().max()).all()


@pytest.mark.parametrize("spec,sparsity", [("unstructured", 0.6), ("2:4", 0.5), ("unstructured:row", 0.7)])
def test_alps_feasible_and_no_worse_than_sparsegpt(spec, sparsity):
    w, gram = planted()
    pattern = parse_pattern(spec)
    res = alps.solve(w, gram, pattern, sparsity, pcg_track=True)
    assert pattern.verify(res.weight, sparsity).ok
    assert torch.equal(res.weight != 0, res.mask) or bool(((res.weight != 0) <= res.mask).all())
    ours = reconstruction_error(w, res.weight, gram)[1]
    theirs = reconstruction_error(w, sparsegpt.solve(w, gram, pattern, sparsity).weight, gram)[1]
    assert ours <= theirs
    obj = torch.tensor(res.stats["pcg_objective"])
    assert (obj[1:] <= obj[:-1] + 1e-6 * obj.abs().max()).all()
    assert res.stats["rel_error_scaled"] <= res.stats["rel_error_scaled_before_pcg"] + 1e-9


@pytest.mark.parametrize("spec", PATTERNS)
def test_alps_every_pattern_is_feasible(spec):
    w, gram = planted(out=32, inp=64, tokens=256, seed=4)
    pattern = parse_pattern(spec)
    res = alps.solve(w, gram, pattern, 0.5, max_iter=30)
    check = pattern.verify(res.weight, 0.5)
    assert check.ok, check.detail
    assert res.weight.shape == w.shape and res.weight.dtype == w.dtype


@pytest.mark.parametrize("seed,sparsity", [(5, 0.5), (11, 0.7), (13, 0.9)])
def test_schedule_stops_by_its_rules(seed, sparsity):
    """Stops well before max_iter, at a check where the support froze (after ρ started growing) or, past
    iteration 30, changed by less than 3e-4 of the kept entries; ρ never shrinks once it has started growing."""
    w, gram = planted(seed=seed)
    res = alps.solve(w, gram, parse_pattern("unstructured"), sparsity)
    hist, it = res.stats["support_history"], res.stats["iterations"]
    k = w.numel() - round(sparsity * w.numel())
    assert it < 300 and it == hist[-1]["iter"] and it % 3 == 0
    last = hist[-1]["changed"]
    assert last == 0 or (it - 1 >= 30 and last / k < 3e-4), hist[-3:]
    assert all(h["changed"] > 0 for h in hist[:-1]) or it - 1 >= 30  # no earlier check qualified to stop
    grew = [i for i, h in enumerate(hist) if h["changed"] / k > 0.005]
    assert grew, "the schedule never grew ρ"
    rhos = [h["rho"] for h in hist[grew[0]:]]
    assert all(b >= a for a, b in zip(rhos, rhos[1:]))


def test_schedule_shrinks_a_too_large_rho_and_restarts():
    w, gram = planted(seed=14)
    res = alps.solve(w, gram, parse_pattern("unstructured"), 0.6, rho0=1e3)
    hist = res.stats["support_history"]
    k = w.numel() - round(0.6 * w.numel())
    assert hist[0]["changed"] / k <= 0.005 and hist[1]["rho"] == pytest.approx(hist[0]["rho"] / 5)
    assert pytest.approx(res.stats["rho_final"]) != 1e3 and res.stats["iterations"] < 300


def test_zero_sparsity_keeps_the_weight():
    w, gram = planted(seed=12)
    res = alps.solve(w, gram, parse_pattern("unstructured"), 0.0)
    assert torch.equal(res.weight, w) and bool(res.mask.all())


def test_same_inputs_same_mask():
    w, gram = planted(seed=6)
    pattern = parse_pattern("unstructured")
    a = alps.solve(w, gram, pattern, 0.7)
    b = alps.solve(w, Gram(gram.matrix.clone(), gram.n_tokens), pattern, 0.7)
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.weight, b.weight)


def test_ridge_modes_agree_and_eigendecomposition_is_shared():
    w, gram = planted(seed=7)
    pattern = parse_pattern("unstructured")
    a = alps.solve(w, gram, pattern, 0.6, ridge="eig", dtype="float64")
    b = alps.solve(w, gram, pattern, 0.6, ridge="inverse", dtype="float64")
    assert b.stats["eigh_s"] == 0.0  # second matrix on the same Gram reuses the factorisation
    c = alps.solve(w, gram, pattern, 0.6, ridge="cholesky", dtype="float64")
    assert torch.equal(a.mask, b.mask) and torch.equal(a.mask, c.mask)
    assert torch.allclose(a.weight, b.weight, atol=1e-8)
    assert torch.allclose(a.weight, c.weight, atol=1e-8)


@pytest.mark.parametrize("rows", [7, 512])
def test_scaled_gram_by_panels_has_the_bits_of_the_whole_float64_copy(rows):
    _, gram = planted(out=8, inp=1100, tokens=1500, seed=15)
    gram.matrix[:, 3] = 0  # a dead input: unit diagonal before damping
    gram.matrix[3, :] = 0
    gram = Gram(gram.matrix, gram.n_tokens)
    h, d = alps.scaled_damped(gram, 0.01, torch.float32, rows=rows)
    reference = gram.matrix.double()  # λ as a mean over the whole matrix's diagonal, as the damping was first written
    reference[3, 3] = 1.0
    reference = torch.diagonal(reference) + 0.01 * torch.mean(torch.diagonal(reference))
    assert torch.equal(gram.damped_diagonal(0.01, torch.float64), reference)
    whole = gram.damped(0.01, torch.float64)
    d64 = torch.diagonal(whole).sqrt()
    assert torch.equal(h, whole.div_(d64.unsqueeze(1)).div_(d64.unsqueeze(0)).float())
    assert torch.equal(d, d64.float())


def test_pcg_iterates_in_x0_storage_with_the_same_bits():
    w, gram = planted(seed=16)
    sg = alps.scaled_gram(gram, 0.01, "float32", "float32")
    b0 = sg.d.unsqueeze(1) * w.T
    g = sg.h @ b0
    mask = alps.keep_mask_scaled(parse_pattern("unstructured"), b0, 0.6)
    x0 = b0 * mask
    copied = masked_pcg(sg.h, g, mask, x0.double(), iters=4)  # another dtype: x0 is copied, not overwritten
    in_place = masked_pcg(sg.h, g, mask, x0, iters=4)
    assert in_place.x.data_ptr() == x0.data_ptr()
    assert torch.equal(in_place.x, copied.x) and in_place.objective == copied.objective


def test_inverses_are_released_before_pcg_unless_another_matrix_reads_them():
    pattern = parse_pattern("unstructured")
    for shared_by, kept in ((1, 0), (3, 1)):
        w, gram = planted(seed=17)
        gram.shared_by = shared_by
        alps.solve(w, gram, pattern, 0.6, schedule=False, max_iter=3)
        assert len(alps.scaled_gram(gram, 0.01, "float32", "float32").inverses) == kept


@pytest.mark.parametrize("warm", ["wanda", "sparsegpt"])
def test_warm_starts(warm):
    w, gram = planted(seed=8)
    pattern = parse_pattern("unstructured")
    res = alps.solve(w, gram, pattern, 0.7, warm_start=warm, rho0=1.0)
    assert pattern.verify(res.weight, 0.7).ok
    assert res.stats["warm_start"] == warm


def test_fixed_rho_and_trace():
    w, gram = planted(seed=9)
    res = alps.solve(w, gram, parse_pattern("unstructured"), 0.6, schedule=False, rho0=0.3, max_iter=20, trace=(5, 20))
    assert res.stats["iterations"] == 20
    assert [t["iter"] for t in res.stats["trace"]] == [5, 20]
    assert all(t["rho"] == 0.3 for t in res.stats["trace"])


@pytest.mark.parametrize("name", ["alps", "alps-fast"])
def test_registered(name):
    spec = SOLVERS[name]
    opts = SOLVERS.options(name)
    w, gram = planted(seed=10)
    res = spec.function()(w, gram, parse_pattern("2:4"), 0.5, **opts.model_dump())
    assert parse_pattern("2:4").verify(res.weight, 0.5).ok


@pytest.mark.parametrize("fam,spec", [("llama", s) for s in PATTERNS] + [("opt", "unstructured"), ("qwen2", "2:4")])
def test_alps_prunes_tiny_model_end_to_end(fam, spec, tokenizer, calib_file):
    from conftest import make_model
    from lmprune import api
    from lmprune.config import build_config

    model = make_model(fam)
    config = build_config(method="alps", sparsity=0.5, pattern=spec, calib=str(calib_file), nsamples=2, seqlen=24)
    manifest = api.prune(model, tokenizer, config, progress=False)
    assert manifest["pattern_ok"]
    assert abs(manifest["achieved_sparsity"] - 0.5) < 0.02
    assert all(layer["rel_error"] < 1.0 for layer in manifest["layers"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", ["unstructured", "2:4"])
def test_alps_runs_on_cuda_like_on_cpu(spec):
    w, gram = planted(seed=13)
    pattern = parse_pattern(spec)
    cpu = alps.solve(w, gram, pattern, 0.6, dtype="float64")
    gpu = alps.solve(w.cuda(), Gram(gram.matrix.cuda(), gram.n_tokens), pattern, 0.6, dtype="float64")
    assert gpu.weight.device.type == "cuda" and pattern.verify(gpu.weight.cpu(), 0.6).ok
    assert (gpu.mask.cpu() != cpu.mask).float().mean() < 0.01
    e_cpu = reconstruction_error(w, cpu.weight, gram)[1]
    e_gpu = reconstruction_error(w, gpu.weight.cpu(), gram)[1]
    assert abs(e_gpu - e_cpu) <= 0.02 * e_cpu


@pytest.mark.parametrize("fam,spec", [(f, s) for f in ("llama", "qwen2", "opt") for s in PATTERNS])
def test_cli_alps_every_pattern_every_family(fam, spec, tiny_model_dirs, calib_file, tmp_path):
    import json

    from lmprune.cli import main

    out = tmp_path / "run"
    args = ["prune", "--quiet", "--model", tiny_model_dirs[fam], "--method", "alps", "--sparsity", "0.5",
            "--pattern", spec, "--calib", calib_file, "--nsamples", "2", "--seqlen", "24", "--out", out]
    assert main([str(a) for a in args]) == 0
    m = json.loads((out / "lmprune.json").read_text())
    assert m["method"] == "alps" and m["pattern"] == spec and m["pattern_ok"] and m["reload_check"]["ok"]
    assert m["achieved_sparsity"] == pytest.approx(0.5, abs=0.02)
    assert all(r["rel_error"] < 1.0 for r in m["layers"])

