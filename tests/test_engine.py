"""The layer-sequential engine against a reference computed with plain hooks on the full model."""

import copy

import pytest
import torch

from conftest import make_model
from lmprune import api
from lmprune.config import build_config
from lmprune.models.adapters import UnsupportedModelError, get_adapter
from lmprune.patterns import parse_pattern
from lmprune.solvers import Gram, get_solver


def _gram_of_inputs(model, module, windows):
    acc = {}

    def hook(m, a, o):
        x = a[0].reshape(-1, a[0].shape[-1]).float()
        acc["h"] = acc.get("h", 0) + x.T @ x
        acc["n"] = acc.get("n", 0) + x.shape[0]

    handle = module.register_forward_hook(hook)
    with torch.no_grad():
        for row in windows:
            model(row.unsqueeze(0))
    handle.remove()
    return Gram(acc["h"], acc["n"])


@pytest.mark.parametrize("fam", ["llama", "opt"])
def test_propagation_matches_reference(fam, tokenizer, calib_file):
    """Block b's Gram matrices must come from the model whose blocks < b are already pruned."""
    model = make_model(fam)
    reference = copy.deepcopy(model)
    config = build_config(method="wanda", sparsity=0.5, calib=str(calib_file), nsamples=3, seqlen=24)
    from lmprune.data.calibration import sample_windows
    from lmprune.data.sources import load_source

    windows = sample_windows(load_source(str(calib_file), "calib"), tokenizer, 3, 24, 0)
    api.prune(model, tokenizer, config, progress=False)

    adapter = get_adapter(reference)
    wanda = get_solver("wanda").function()
    for b, block in enumerate(adapter.blocks(reference)):
        lins = adapter.linears(block)
        grams = {rel: _gram_of_inputs(reference, lin, windows) for rel, lin in lins.items()}
        for rel, lin in lins.items():  # all grams of a block come from its dense weights
            lin.weight.data = wanda(lin.weight.data, grams[rel], parse_pattern("unstructured"), 0.5).weight
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), reference.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5, msg=n1)


def test_sequential_option_changes_later_groups(tokenizer, calib_file):
    a, b = make_model("llama"), make_model("llama")
    kw = dict(method="sparsegpt", sparsity=0.6, calib=str(calib_file), nsamples=2, seqlen=24)
    api.prune(a, tokenizer, build_config(**kw), progress=False)
    api.prune(b, tokenizer, build_config(sequential=True, **kw), progress=False)
    la, lb = get_adapter(a).blocks(a)[0], get_adapter(b).blocks(b)[0]
    assert torch.equal(la.self_attn.q_proj.weight, lb.self_attn.q_proj.weight)  # first group: same inputs
    assert not torch.equal(la.mlp.down_proj.weight, lb.mlp.down_proj.weight)


def test_adapters_find_groups_and_skip_embeddings(tiny_model):
    adapter = get_adapter(tiny_model)
    names = [n for n, _, _ in adapter.matrices(tiny_model)]
    assert len(names) == 2 * len(adapter.linear_names())
    assert not any("embed" in n or "lm_head" in n for n in names)
    assert all(len(g) >= 1 for g in adapter.groups)


def test_structure_is_discovered_whatever_the_family_is_called():
    model = make_model("llama")
    model.config.model_type = "mystery"
    assert get_adapter(model).groups[0] == ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def test_a_model_without_decoder_blocks_is_rejected():
    with pytest.raises(UnsupportedModelError, match="no decoder block list"):
        get_adapter(torch.nn.Sequential(torch.nn.Linear(4, 4)))


def _prune_and_check(model, tokenizer, calib_file, pattern, method="sparsegpt"):
    before = {n: torch.count_nonzero(p).item() for n, p in model.named_parameters() if "embed" in n or "lm_head" in n}
    config = build_config(method=method, sparsity=0.5, pattern=pattern, calib=str(calib_file), nsamples=2, seqlen=16)
    report = api.prune(model, tokenizer, config, progress=False)
    assert report["pattern_ok"]
    assert report["achieved_sparsity"] == pytest.approx(0.5, abs=0.02)
    p = parse_pattern(pattern)
    for rec in report["layers"]:
        w = model.get_submodule(rec["name"]).weight
        assert p.verify(w, 0.5).ok
        assert 0 <= rec["rel_error"] < 1.0
    after = {n: torch.count_nonzero(p).item() for n, p in model.named_parameters() if n in before}
    assert after == before  # embeddings and lm_head untouched


@pytest.mark.parametrize("pattern", ["unstructured", "unstructured:row", "2:4", "4:8", "block:4", "row"])
def test_every_pattern(tokenizer, calib_file, pattern):
    _prune_and_check(make_model("llama"), tokenizer, calib_file, pattern)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_family(tiny_model, tokenizer, calib_file, method):
    _prune_and_check(tiny_model, tokenizer, calib_file, "unstructured", method)


def test_block_selection(tokenizer, calib_file):
    model = make_model("llama")
    config = build_config(method="magnitude", sparsity=0.5, calib=str(calib_file), nsamples=1, seqlen=16, blocks="first-half")
    report = api.prune(model, tokenizer, config, progress=False)
    assert {r["block"] for r in report["layers"]} == {0}
    assert torch.count_nonzero(model.model.layers[1].mlp.down_proj.weight) == model.model.layers[1].mlp.down_proj.weight.numel()


def test_calibration_time_counts_the_passes_through_blocks(tokenizer, calib_file):
    model = make_model("llama")
    m = api.prune(model, tokenizer, build_config(method="magnitude", sparsity=0.5, calib=str(calib_file), nsamples=2,
                                                 seqlen=24), progress=False)
    assert 0 < m["calibration_time_s"] <= m["time_s"]
    assert 0 < m["error_time_s"] and m["calibration_time_s"] + m["solver_time_s"] + m["error_time_s"] <= m["time_s"]


@pytest.mark.parametrize("where", ["host", "disk"])
@pytest.mark.parametrize("method,extra", [("sparsegpt", {}), ("sparsellm", {}), ("wanda", {"allocation": "owl"}),
                                          ("sparsegpt", {"sequential": True, "calib_batch_size": 2})])
def test_offloaded_activations_give_identical_weights(tokenizer, calib_file, tmp_path, method, extra, where):
    """Offload only changes where the activations are kept (host memory or files), never the arithmetic:
    bit-identical weights; the files are gone afterwards."""
    a, b = make_model("llama"), make_model("llama")
    kw = dict(method=method, sparsity=0.5, calib=str(calib_file), nsamples=3, seqlen=24, **extra)
    offload = {"offload_activations": True} if where == "host" else {"offload_dir": str(tmp_path / "acts")}
    ra = api.prune(a, tokenizer, build_config(**kw), progress=False)
    rb = api.prune(b, tokenizer, build_config(**offload, **kw), progress=False)
    assert all(rb["config"][k] == v for k, v in offload.items())
    for (n1, p1), (n2, p2) in zip(a.named_parameters(), b.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2), n1
    assert [r["rel_error"] for r in ra["layers"]] == [r["rel_error"] for r in rb["layers"]]
    if where == "disk":
        assert list((tmp_path / "acts").iterdir()) == []


def test_disk_offload_reads_one_window_at_a_time(tokenizer, calib_file, tmp_path, monkeypatch):
    """With --offload-dir the store keeps its windows in a WindowFile, never a list of every window, and each
    block's input file is deleted once its outputs are written."""
    from lmprune.activations import ActivationStore, WindowFile

    seen, alive = [], []
    original = ActivationStore.propagate

    def spy(self, fn, size=1):
        seen.append(type(self._windows))

        def counting(x):
            alive.append(len(list((tmp_path / "acts").rglob("*.bin"))))
            return fn(x)

        original(self, counting, size)

    monkeypatch.setattr(ActivationStore, "propagate", spy)
    api.prune(make_model("llama"), tokenizer, build_config(method="wanda", sparsity=0.5, calib=str(calib_file),
              nsamples=2, seqlen=16, offload_dir=str(tmp_path / "acts")), progress=False)
    assert seen and set(seen) == {WindowFile}
    assert set(alive) == {2}  # the block's inputs and its outputs; the previous block's inputs were deleted
    assert not list((tmp_path / "acts").rglob("*.bin"))


def test_offload_keeps_block_outputs_on_the_activation_device(tokenizer, calib_file):
    """The store moves each window to the compute device and keeps the outputs where the inputs are kept."""
    from lmprune.activations import ActivationStore
    from lmprune.data.calibration import sample_windows
    from lmprune.data.sources import load_source
    from lmprune.engine import BlockContext, _block_output, capture_inputs

    model = make_model("llama")
    adapter = get_adapter(model)
    windows = sample_windows(load_source(str(calib_file), "calib"), tokenizer, 2, 16, 0)
    store = ActivationStore("cpu", "host")
    capture_inputs(model, adapter, windows, store, progress=False)
    inputs = list(store)
    block = adapter.blocks(model)[0]
    moved = []
    original = torch.Tensor.to

    def spy(self, *args, **kw):
        moved.append(args[0] if args else kw.get("device"))
        return original(self, *args, **kw)

    ctx = BlockContext(0, block, adapter, store, None)
    assert store.storage == torch.device("cpu")
    torch.Tensor.to = spy
    try:
        ctx.propagate()
    finally:
        torch.Tensor.to = original
    outs = list(store)
    assert len(outs) == 2 and all(o.device.type == "cpu" for o in outs)
    assert moved.count(torch.device("cpu")) >= 4  # each window in, each output back
    with torch.no_grad():
        for o, x in zip(outs, inputs):
            assert torch.equal(o, _block_output(block(x, **store.kwargs)))


@pytest.mark.parametrize("fam", ["llama", "opt", "qwen2"])
def test_batched_calibration_passes_match_one_window_at_a_time(fam, tokenizer, calib_file):
    """Several windows per block pass (the GPU speed-up) must prune to the same weights as one at a time."""
    a, b = make_model(fam), make_model(fam)
    kw = dict(method="sparsegpt", sparsity=0.5, calib=str(calib_file), nsamples=5, seqlen=24)
    ma = api.prune(a, tokenizer, build_config(**kw), progress=False)
    mb = api.prune(b, tokenizer, build_config(calib_batch_size=2, **kw), progress=False)  # batches of 2, 2, 1
    for (n1, p1), (_, p2) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5, msg=n1)
    assert [r["rel_error"] for r in ma["layers"]] == pytest.approx([r["rel_error"] for r in mb["layers"]], rel=1e-3)


def test_gram_sums_do_not_depend_on_how_windows_are_grouped():
    """``GramSum``: one process adding windows 0..n-1 and two ranks adding their shares and then each other's
    (all_reduce of the panels) reach the same bits, also with outlier features that make float32 sums
    order-dependent; the rounded matrix is exactly symmetric and equals the float64 product."""
    from lmprune.gram_sum import GRAM_ROWS, GramSum, lower_words

    g = torch.Generator().manual_seed(0)
    d = 2 * GRAM_ROWS + 40  # three row panels, the last one narrow
    windows = [torch.randn(24, d, generator=g) for _ in range(7)]
    for w in windows:
        w[:, :3] *= 300.0  # massive activations, as LLMs have
    one = GramSum(d)
    for w in windows:
        one.add_(w)
    # three panels hold 73% of the full matrix; at LLaMA-2-7B's widths (8 and 22 panels) 56% and 52%
    assert sum(p.numel() for p in one.panels) == lower_words(d) < 0.75 * d * d
    assert lower_words(4096) / 4096**2 == 0.5625 and lower_words(11008) / 11008**2 < 0.53
    ranks = [GramSum(d) for _ in range(2)]
    for k, w in enumerate(windows):
        ranks[k >= 4].add_(w)
    for a, b in zip(ranks[1].panels, ranks[0].panels):
        a.add_(b)
    h = one.rounded()
    assert not one.panels  # released as copied
    assert torch.equal(h, ranks[1].rounded()) and torch.equal(h, h.T)
    reference = sum(w.double().T @ w.double() for w in windows)
    torch.testing.assert_close(h, reference.float(), rtol=1e-6, atol=1e-2)


def test_the_lower_triangle_sum_equals_the_full_products_bit_for_bit():
    """Summing only the lower triangle (half the multiply-adds) gives the bits the full ``xᵀx`` in 2048-row panels
    gave before it, at this machine's BLAS and the shapes of the tests and of SmolLM2 (the golden hashes pin the
    rest)."""
    from lmprune.gram_sum import GramSum

    g = torch.Generator().manual_seed(1)
    for tokens, d in ((64, 64), (512, 576), (256, 1536)):
        x = torch.randn(tokens, d, generator=g) * (1 + 3 * torch.rand(d, generator=g))
        full = torch.zeros(d, d, dtype=torch.float64)
        for lo in range(0, d, 2048):
            full[lo:lo + 2048].add_(x[:, lo:lo + 2048].T @ x)
        lower = GramSum(d)
        lower.add_(x)
        assert torch.equal(lower.rounded(), full.float()), (tokens, d)


def test_outer_products_added_by_row_panels_equal_the_whole_product_bit_for_bit():
    """``add_outer_`` (SparseLLM's ``d_ff x d_ff`` moments and its error reports' Gram matrices) adds ``aᵀa`` a panel
    of rows at a time: the same bits as the whole product at this machine's BLAS, in float32 and float64 sums."""
    from lmprune.gram_sum import add_outer_

    g = torch.Generator().manual_seed(2)
    for tokens, n, rows in ((64, 200, 64), (333, 1000, 512), (1024, 1536, 512), (100, 700, 1024)):
        a = torch.randn(tokens, n, generator=g) * (1 + 3 * torch.rand(n, generator=g))
        for dtype in (torch.float32, torch.float64):
            start = torch.randn(n, n, generator=g).to(dtype)
            expected = start.clone().add_(a.T @ a)
            assert torch.equal(add_outer_(start, a, rows), expected), (tokens, n, rows, dtype)


def test_a_gram_matrix_is_released_once_its_last_reader_is_written(tokenizer, calib_file, monkeypatch):
    """Memory at real shapes: when down_proj is solved, the Gram matrices of q/k/v, o and gate/up (and the
    factorisations cached on them) are gone, and so is up_proj's result."""
    import gc
    import weakref

    from lmprune.layer_pruner import LayerPruner

    alive_at_call: list[int] = []
    seen: list[weakref.ref] = []
    solve = LayerPruner.solve

    def spy(self, weight, gram, target):
        gc.collect()
        alive_at_call.append(len({id(r()) for r in seen if r() is not None}))  # distinct Gram objects
        seen.append(weakref.ref(gram))
        return solve(self, weight, gram, target)

    monkeypatch.setattr(LayerPruner, "solve", spy)
    config = build_config(method="sparsegpt", sparsity=0.5, calib=str(calib_file), nsamples=2, seqlen=16,
                          blocks="0")
    report = api.prune(make_model("llama"), tokenizer, config, progress=False)
    names = [r["name"].rsplit(".", 1)[-1] for r in report["layers"]]
    assert names[-1] == "down_proj" and len(alive_at_call) == 7
    # q/k/v share one Gram (alive while k and v are solved), then o's, gate/up's; none is left at down_proj
    assert alive_at_call == [0, 1, 1, 0, 0, 1, 0]


def test_a_rank_receives_only_the_gram_matrices_its_matrices_read(tokenizer, calib_file, monkeypatch):
    """With owners, ``collect_grams`` hands a rank only the Gram matrices of the groups it solves a matrix of (the
    others' partial sums are reduced into their owner and dropped here); the one it keeps counts only its own
    readers. Seen from rank 1 of 2 (identity collectives) owning o_proj alone."""
    from lmprune.distributed import World
    from lmprune.strategies import layerwise

    seen: list[dict] = []
    original = layerwise.prune_groups

    def spy(ctx, stages, stats=None, expert_min_tokens=1):
        stage = stages[0]
        real, ctx.world = ctx.world, World(rank=1, size=2)
        got = ctx.collect_grams(stage, 1, {r: int(r.endswith("o_proj")) for r in stage})
        ctx.world = real
        seen.append({r.rsplit(".", 1)[-1]: None if g is None else g.shared_by for r, g in got.items()})
        return original(ctx, stages, stats, expert_min_tokens)

    monkeypatch.setattr(layerwise, "prune_groups", spy)
    config = build_config(method="sparsegpt", sparsity=0.5, calib=str(calib_file), nsamples=2, seqlen=16,
                          blocks="0")
    api.prune(make_model("llama"), tokenizer, config, progress=False)
    assert seen == [{"q_proj": None, "k_proj": None, "v_proj": None, "o_proj": 1, "gate_proj": None,
                     "up_proj": None, "down_proj": None}]
