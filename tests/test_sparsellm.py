import os

import pytest
import torch
import torch.nn.functional as F

from lmprune.patterns import parse_pattern
from lmprune.solvers import Gram, get_solver
from lmprune.solvers.sparsellm import Options, FFNData, prune_ffn_relu, prune_ffn_swiglu

T, D, DFF = 1024, 32, 96


def _inner(pattern, solver="sparsegpt"):
    fn = get_solver(solver).function()
    return lambda w, gram, target: fn(w, gram, pattern, target)


def _inputs(seed, dead=(), rank=None):
    torch.manual_seed(seed)
    x = torch.randn(T, D) @ (torch.randn(D, D) / D**0.5) + 0.2 * torch.randn(D)
    if rank is not None:  # rank-deficient: every column a mix of `rank` sources
        x = torch.randn(T, rank) @ torch.randn(rank, D)
    for j in dead:
        x[:, j] = 0
    return x


def _relu_ffn(seed):
    torch.manual_seed(seed + 100)
    return (torch.randn(DFF, D) / D**0.5, 0.1 * torch.randn(DFF), torch.randn(D, DFF) / DFF**0.5, 0.1 * torch.randn(D))


def _swiglu_ffn(seed):
    torch.manual_seed(seed + 200)
    return torch.randn(DFF, D) / D**0.5, torch.randn(DFF, D) / D**0.5, torch.randn(D, DFF) / DFF**0.5


def _relu_out(x, w1, b1, w2, b2):
    return torch.relu(x @ w1.T + b1) @ w2.T + b2


def _swiglu_out(x, up, gate, down):
    return (F.silu(x @ gate.T) * (x @ up.T)) @ down.T


def _err(y, out):
    return float((y.double() - out.double()).pow(2).sum())


def _non_increasing(values, rtol=1e-6):
    return all(b <= a * (1 + rtol) + 1e-9 for a, b in zip(values, values[1:]))


@pytest.mark.parametrize("spec,sparsity", [("unstructured", 0.7), ("unstructured", 0.9), ("2:4", 0.5)])
def test_relu_objective_monotone_exact_sparsity_and_beats_layerwise(spec, sparsity):
    pattern = parse_pattern(spec)
    x = _inputs(0)
    w1, b1, w2, b2 = _relu_ffn(0)
    y = _relu_out(x, w1, b1, w2, b2)
    out = prune_ffn_relu(FFNData.relu(x, y, w1, b1, w2, b2), pattern, {"fc1": sparsity, "fc2": sparsity}, _inner(pattern), rounds=4)
    st = out.stats
    assert len(st["objective"]) == 4 and _non_increasing(st["objective"])
    for key, res in out.results.items():
        check = pattern.verify(res.weight, sparsity)
        assert check.ok, (key, check.detail)
        assert abs(check.achieved_sparsity - pattern.effective_sparsity(sparsity)) < 0.01
        assert torch.isfinite(res.weight).all()
    fc1, fc2 = out.results["fc1"].weight, out.results["fc2"].weight
    final = _err(y, _relu_out(x, fc1, b1, fc2, b2))
    assert final == pytest.approx(st["final_ffn_error"], rel=1e-4)
    # plain layer-wise inner solver: fc1 on X, fc2 from its dense weights on the dense activations
    inner = _inner(pattern)
    lw1 = inner(w1, Gram.from_inputs(x), sparsity).weight
    lw2 = inner(w2, Gram.from_inputs(torch.relu(x @ w1.T + b1)), sparsity).weight
    layerwise = _err(y, _relu_out(x, lw1, b1, lw2, b2))
    assert final <= layerwise * (1 + 1e-5)
    assert final < layerwise  # the refit of fc2 on the pruned activations helps on random FFNs


@pytest.mark.parametrize("spec,sparsity", [("unstructured", 0.8), ("2:4", 0.5)])
def test_swiglu_objective_monotone_exact_sparsity_and_beats_layerwise(spec, sparsity):
    pattern = parse_pattern(spec)
    x = _inputs(1)
    up, gate, down = _swiglu_ffn(1)
    y = _swiglu_out(x, up, gate, down)
    out = prune_ffn_swiglu(FFNData.swiglu(x, y, up, gate, down), pattern, sparsity, _inner(pattern), rounds=4, s_steps=3)
    st = out.stats
    assert _non_increasing(st["objective"])
    assert st["objective"][-1] < st["objective"][0]
    for key in ("up", "gate", "down"):
        assert pattern.verify(out.results[key].weight, sparsity).ok
    w = {k: r.weight for k, r in out.results.items()}
    final = _err(y, _swiglu_out(x, w["up"], w["gate"], w["down"]))
    inner = _inner(pattern)
    gx = Gram.from_inputs(x)
    lw_up, lw_gate = inner(up, gx, sparsity).weight, inner(gate, gx, sparsity).weight
    lw_down = inner(down, Gram.from_inputs(F.silu(x @ gate.T) * (x @ up.T)), sparsity).weight
    assert final <= _err(y, _swiglu_out(x, lw_up, lw_gate, lw_down)) * (1 + 1e-5)


@pytest.mark.parametrize("general", [False, True])
def test_objective_monotone_for_unequal_penalties(general):
    pattern = parse_pattern("unstructured")
    x = _inputs(2)
    up, gate, down = _swiglu_ffn(2)
    y = _swiglu_out(x, up, gate, down)
    kw = dict(alpha=0.3, beta=2.0, gamma=7.0) if general else dict(alpha=5.0, beta=5.0, gamma=5.0)
    out = prune_ffn_swiglu(FFNData.swiglu(x, y, up, gate, down), pattern, 0.7, _inner(pattern), rounds=5, refit_down=False, **kw)
    assert _non_increasing(out.stats["objective"])


def test_dead_channels_and_rank_deficient_inputs_stay_finite():
    pattern = parse_pattern("unstructured")
    x = _inputs(3, dead=(0, 5, 9), rank=6)
    w1, b1, w2, b2 = _relu_ffn(3)
    b1 = b1 - 10.0 * (torch.arange(DFF) < 20)  # the first 20 hidden units never fire
    y = _relu_out(x, w1, b1, w2, b2)
    out = prune_ffn_relu(FFNData.relu(x, y, w1, b1, w2, b2), pattern, {"fc1": 0.8, "fc2": 0.8}, _inner(pattern), rounds=3)
    assert all(torch.isfinite(r.weight).all() for r in out.results.values())
    assert all(v == v and abs(v) != float("inf") for v in out.stats["objective"])
    assert _non_increasing(out.stats["objective"])

    up, gate, down = _swiglu_ffn(3)
    y = _swiglu_out(x, up, gate, down)
    out = prune_ffn_swiglu(FFNData.swiglu(x, y, up, gate, down), pattern, 0.8, _inner(pattern), rounds=3)
    assert all(torch.isfinite(r.weight).all() for r in out.results.values())
    assert all(pattern.verify(r.weight, 0.8).ok for r in out.results.values())


def test_non_finite_inner_results_never_reach_the_weights():
    pattern = parse_pattern("unstructured")
    x = _inputs(4)
    up, gate, down = _swiglu_ffn(4)
    y = _swiglu_out(x, up, gate, down)
    base = _inner(pattern)
    calls = {"n": 0}

    def flaky(w, gram, target):
        calls["n"] += 1
        res = base(w, gram, target)
        if calls["n"] > 4:  # after round 0 every result is poisoned
            res.weight = res.weight.clone()
            res.weight[0, 0] = float("nan")
        return res

    out = prune_ffn_swiglu(FFNData.swiglu(x, y, up, gate, down), pattern, 0.7, flaky, rounds=3)
    assert all(torch.isfinite(r.weight).all() for r in out.results.values())
    assert all(all(k) for k in out.stats["kept_previous"][1:])


def test_chunking_does_not_change_the_result():
    pattern = parse_pattern("unstructured")
    x = _inputs(5)
    w1, b1, w2, b2 = _relu_ffn(5)
    y = _relu_out(x, w1, b1, w2, b2)
    a = prune_ffn_relu(FFNData.relu(x, y, w1, b1, w2, b2), pattern, {"fc1": 0.7, "fc2": 0.7}, _inner(pattern), rounds=2, chunk_tokens=T)
    b = prune_ffn_relu(FFNData.relu(x, y, w1, b1, w2, b2), pattern, {"fc1": 0.7, "fc2": 0.7}, _inner(pattern), rounds=2, chunk_tokens=100)
    assert a.stats["final_ffn_error"] == pytest.approx(b.stats["final_ffn_error"], rel=1e-3)


def test_options_validate():
    assert Options(rounds=2).rounds == 2
    with pytest.raises(Exception):
        Options(delta=1.0)


@pytest.mark.parametrize("s_update", ["gauss-newton", "gradient"])
@pytest.mark.parametrize("threads", [1, 2])
def test_row_blocked_s_update_gives_the_whole_chunks_bits(monkeypatch, s_update, threads):
    """The s-update runs on row blocks of a token chunk to bound its temporaries; being element-wise, it must give
    the bits of one whole-chunk update (1024 tokens in one chunk: two blocks of 512; odd d_ff)."""
    import lmprune.solvers.sparsellm as sl

    pattern = parse_pattern("unstructured")
    x = _inputs(3)
    torch.manual_seed(7)
    up, gate, down = torch.randn(37, D) / D**0.5, torch.randn(37, D) / D**0.5, torch.randn(D, 37) / 37**0.5
    y = _swiglu_out(x, up, gate, down)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        runs = []
        for rows in (sl._ELEMENTWISE_ROWS, 10**9):
            monkeypatch.setattr(sl, "_ELEMENTWISE_ROWS", rows)
            out = prune_ffn_swiglu(FFNData.swiglu(x, y, up, gate, down), pattern, 0.6, _inner(pattern), rounds=3,
                                   s_update=s_update, chunk_tokens=T)
            runs.append(out)
    finally:
        torch.set_num_threads(before)
    blocked, whole = runs
    assert blocked.stats["objective"] == whole.stats["objective"]
    for role in ("up", "gate", "down"):
        assert torch.equal(blocked.results[role].weight, whole.results[role].weight)


@pytest.mark.parametrize("kind", ["relu", "swiglu"])
def test_auxiliaries_in_files_give_the_bits_of_memory(tmp_path, kind):
    """With ``aux_dir`` the auxiliaries live in files, one token chunk in memory at a time (four chunks here);
    every round, statistic and weight is the same as with them in memory, and no file is left behind."""
    pattern = parse_pattern("unstructured")
    x = _inputs(5)
    if kind == "relu":
        w1, b1, w2, b2 = _relu_ffn(5)
        data, prune = FFNData.relu(x, _relu_out(x, w1, b1, w2, b2), w1, b1, w2, b2), prune_ffn_relu
    else:
        up, gate, down = _swiglu_ffn(5)
        data, prune = FFNData.swiglu(x, _swiglu_out(x, up, gate, down), up, gate, down), prune_ffn_swiglu
    memory = prune(data, pattern, 0.7, _inner(pattern), rounds=3, chunk_tokens=256)
    # the inputs and targets in files too, as the strategy hands them over with --offload-dir
    x_file, y_file = (_file_rows(t, tmp_path) for t in (data.x, data.y))
    data.x, data.y = x_file, y_file
    files = prune(data, pattern, 0.7, _inner(pattern), aux_dir=str(tmp_path), rounds=3, chunk_tokens=256)
    x_file.close(), y_file.close()
    for key in ("objective", "ffn_error", "refit_down_error", "best_round", "aux_mb"):
        assert files.stats[key] == memory.stats[key], key
    for role in memory.results:
        assert torch.equal(files.results[role].weight, memory.results[role].weight)
    assert list(tmp_path.iterdir()) == []


def _file_rows(t, directory):
    from lmprune.activations import TokenRows

    rows = TokenRows(*t.shape, directory=directory)
    rows.write(slice(None), t)
    return rows


def _open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts open files through /proc")
def test_non_finite_inputs_are_refused_and_release_the_auxiliaries(tmp_path):
    """A NaN in a later token chunk of the inputs (read from a file) stops the first pass with a one-line error,
    and the auxiliaries' files opened for it are closed."""
    pattern = parse_pattern("unstructured")
    x = _inputs(3)
    up, gate, down = _swiglu_ffn(3)
    y = _swiglu_out(x, up, gate, down)
    x[700, 5] = float("nan")
    x_file, y_file = _file_rows(x, tmp_path), _file_rows(y, tmp_path)
    before = _open_files()
    try:
        prune_ffn_swiglu(FFNData.swiglu(x_file, y_file, up, gate, down), pattern, 0.5, _inner(pattern),
                         aux_dir=str(tmp_path), chunk_tokens=256)
    except ValueError as error:  # counted while the error (and so the failed solver's frames) is alive
        assert "NaN/Inf (tokens 512:768)" in str(error)
        assert _open_files() == before
    else:
        pytest.fail("non-finite inputs were accepted")
    x_file.close(), y_file.close()


def test_token_rows_read_and_write_by_row_ranges(tmp_path):
    """In memory, reading gives a view and writing a copy returns the stored rows; in a file, rows come back as
    written, a range past what was written is an error, and a value of the wrong size is refused."""
    from lmprune.activations import TokenRows

    value = torch.randn(10, 3)
    mem = TokenRows(10, 3)
    held = mem.write(slice(2, 5), value[2:5])
    assert torch.equal(mem.read(slice(2, 5)), value[2:5]) and held.data_ptr() == mem.read(slice(2, 5)).data_ptr()
    mem.read(slice(2, 5))[0, 0] = 7.0
    assert float(mem.read(slice(2, 3))[0, 0]) == 7.0
    disk = TokenRows(10, 3, directory=tmp_path)
    assert list(tmp_path.iterdir()) == []  # unlinked at once: nothing left behind a kill
    disk.write(slice(0, 10), value)
    disk.write(slice(4, 6), value[:2] * 2)
    assert torch.equal(disk.read(slice(4, 6)), value[:2] * 2) and torch.equal(disk.read(slice(7, 10)), value[7:])
    with pytest.raises(ValueError, match="does not fill rows"):
        disk.write(slice(0, 2), value[:3])
    fresh = TokenRows(10, 3, directory=tmp_path)
    fresh.write(slice(0, 4), value[:4])
    with pytest.raises(OSError, match="never written"):
        fresh.read(slice(6, 10))
    disk.close(), fresh.close(), mem.close()


@pytest.mark.parametrize("in_files", [False, True])
def test_non_finite_auxiliaries_end_the_rounds_with_the_best_standing(tmp_path, in_files):
    """A diverging gradient s-step makes the auxiliaries non-finite: the loop stops after that round (noticed as
    the chunks are written, in memory or in files) and the weights are the best finite round's."""
    pattern = parse_pattern("unstructured")
    x = _inputs(2)
    up, gate, down = _swiglu_ffn(2)
    y = _swiglu_out(x, up, gate, down)
    out = prune_ffn_swiglu(FFNData.swiglu(x, y, up, gate, down), pattern, 0.5, _inner(pattern), rounds=4,
                           s_update="gradient", s_lr=1e38, chunk_tokens=256,
                           aux_dir=str(tmp_path) if in_files else None)
    assert out.stats["stopped"] == "round 0: non-finite auxiliary variables"
    assert len(out.stats["objective"]) == 1
    assert all(torch.isfinite(r.weight).all() for r in out.results.values())


def test_least_squares_refits_never_copy_their_factor(monkeypatch):
    """Memory at real shapes: the refits (every round's and the down candidate's) solve with the float64 factor
    where it lies. ``torch.cholesky_solve`` would copy the whole ``d_ff x d_ff`` factor (6.3 GiB at LLaMA-3-70B),
    so it must not be reached; the result is the one it gives (the ``spd`` tests pin the bits)."""
    calls = []
    monkeypatch.setattr(torch, "cholesky_solve", lambda *a, **k: calls.append(a) or pytest.fail("factor copied"))
    solve_triangular = torch.linalg.solve_triangular
    monkeypatch.setattr(torch.linalg, "solve_triangular", lambda *a, **k: calls.append(a) or solve_triangular(*a, **k))
    pattern = parse_pattern("unstructured")
    x = _inputs(7)
    up, gate, down = _swiglu_ffn(7)
    out = prune_ffn_swiglu(FFNData.swiglu(x, _swiglu_out(x, up, gate, down), up, gate, down), pattern, 0.6,
                           _inner(pattern), rounds=2)
    assert calls and out.stats["refit_down_error"] and len(out.stats["objective"]) == 2


@pytest.mark.parametrize("aux_dir", [False, True])
def test_moments_wait_in_files_while_the_inner_solver_runs(tmp_path, aux_dir):
    """Memory at real shapes: with ``aux_dir`` no ``d_ff x d_ff`` float64 matrix is in memory when the inner solver
    starts on the down projection (every round's and the refit candidate's): the moments wait in files, to be
    read back for the subproblem's value. In memory they are there, and the weights are the same bits."""
    import gc
    import warnings

    pattern = parse_pattern("unstructured")
    x = _inputs(4)
    up, gate, down = _swiglu_ffn(4)
    d_ff = up.shape[0]
    solve, held = _inner(pattern), []

    def inner(weight, gram, target):
        if weight.shape[1] == d_ff:
            with warnings.catch_warnings():  # isinstance on a deprecated torch.distributed alias warns
                warnings.simplefilter("ignore")
                held.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)
                                and o.dtype == torch.float64 and tuple(o.shape) == (d_ff, d_ff)))
        return solve(weight, gram, target)

    def run(directory, inner_solve):
        data = FFNData.swiglu(x, _swiglu_out(x, up, gate, down), up, gate, down)
        return prune_ffn_swiglu(data, pattern, 0.6, inner_solve, aux_dir=directory, rounds=2)

    out = run(str(tmp_path) if aux_dir else None, inner)
    assert len(held) == 4  # round 0, round 1, and each round's refit candidate
    assert all(n == 0 for n in held) if aux_dir else all(n >= 1 for n in held)
    reference = run(None, solve)
    for role in out.results:
        assert torch.equal(out.results[role].weight, reference.results[role].weight)


@pytest.mark.parametrize("ffn", ["relu", "swiglu"])
def test_the_update_pass_inverse_is_gone_before_the_next_moments_exist(monkeypatch, ffn):
    """Memory at real shapes: the p-update's ``(βWᵀW + γI)⁻¹`` (``d_ff x d_ff`` float32) is released before the
    next round's ``d_ff x d_ff`` float64 moments are gathered (a pass of its own, the same bits as gathering them
    in the update pass: the golden hashes pin that)."""
    import gc
    import warnings

    from lmprune.solvers import sparsellm

    pattern = parse_pattern("unstructured")
    x = _inputs(5)
    if ffn == "relu":
        w1, b1, w2, b2 = _relu_ffn(5)
        d_ff = w1.shape[0]
        data = FFNData.relu(x, _relu_out(x, w1, b1, w2, b2), w1, b1, w2, b2)
        prune = prune_ffn_relu
    else:
        up, gate, down = _swiglu_ffn(5)
        d_ff = up.shape[0]
        data = FFNData.swiglu(x, _swiglu_out(x, up, gate, down), up, gate, down)
        prune = prune_ffn_swiglu
    add, inverses = sparsellm.add_outer_, []

    def counting_add(h, a):
        if h.shape == (d_ff, d_ff) and not h.abs().sum():  # a fresh sum: its first chunk
            with warnings.catch_warnings():  # isinstance on a deprecated torch.distributed alias warns
                warnings.simplefilter("ignore")
                inverses.append(sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor)
                                    and o.dtype == torch.float32 and tuple(o.shape) == (d_ff, d_ff)))
        return add(h, a)

    monkeypatch.setattr(sparsellm, "add_outer_", counting_add)
    prune(data, pattern, 0.6, _inner(pattern), rounds=3, refit_down=False)
    # three fresh d_ff x d_ff sums: the first pass's and the two update passes' (without refit_down the measuring
    # passes gather none); only the update passes' could meet the inverse, and none does
    assert len(inverses) == 3 and inverses == [0, 0, 0]


def test_a_parked_candidate_keeps_no_tensor_in_memory(tmp_path):
    """The best round's matrices wait in files with ``aux_dir`` (the later rounds make new ones) and come back
    as the same bits, masks included."""
    import weakref

    from lmprune.solvers.base import SolveResult
    from lmprune.solvers.sparsellm import _Candidate

    w = torch.randn(6, 5)
    mask = w.abs() > 0.5
    stats = {"k": 1}
    kept = _Candidate(0.25, {"down": SolveResult(w.clone(), mask.clone(), stats)}, "1+refit_down", str(tmp_path))
    res = SolveResult(w.clone(), None, {})
    alive = weakref.ref(res.weight)
    parked = _Candidate(0.5, {"up": res}, 2, str(tmp_path))
    del res
    assert alive() is None  # nothing but the file holds it now
    back = kept.results()["down"]
    assert torch.equal(back.weight, w) and torch.equal(back.mask, mask) and back.stats is stats
    assert kept.error == 0.25 and kept.label == "1+refit_down"
    assert torch.equal(parked.results()["up"].weight, w) and parked.results()["up"].mask is None
    in_memory = SolveResult(w, mask, stats)
    assert _Candidate(0.1, {"down": in_memory}, 0, None).results()["down"].weight is w


def test_a_refit_candidate_shares_its_rounds_parked_files(tmp_path, monkeypatch):
    """The refitted down projection replaces one matrix of its round's candidate: only it is written to a file;
    up and gate are the round candidate's files, read back as the same bits."""
    from lmprune.solvers import sparsellm
    from lmprune.solvers.base import SolveResult

    written = []
    real = sparsellm.Parked
    monkeypatch.setattr(sparsellm, "Parked", lambda value, d=None: written.append(tuple(value.shape)) or real(value, d))
    ws = {k: torch.randn(4 + i, 3) for i, k in enumerate(("gate", "up", "down"))}
    rnd = sparsellm._Candidate(0.5, {k: SolveResult(v.clone(), v != 0, {}) for k, v in ws.items()}, 0, str(tmp_path))
    assert len(written) == 6
    refit = torch.randn(6, 3)
    cand = rnd.replacing("down", SolveResult(refit.clone(), None, {"refit": 1}), 0.25, "0+refit_down")
    assert written[6:] == [(6, 3)]  # the refitted weight alone (it has no mask)
    back = cand.results()
    assert list(back) == ["gate", "up", "down"] and cand.error == 0.25 and cand.label == "0+refit_down"
    assert torch.equal(back["gate"].weight, ws["gate"]) and torch.equal(back["up"].mask, ws["up"] != 0)
    assert torch.equal(back["down"].weight, refit) and back["down"].mask is None
    assert torch.equal(rnd.results()["down"].weight, ws["down"])  # the round's candidate itself is unchanged
