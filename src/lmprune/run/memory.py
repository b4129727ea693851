"""Peak-memory planning from the model's configuration alone (no weights are read).

The model is instantiated on PyTorch's ``meta`` device, which gives every parameter's shape without allocating
storage; the plan adds, per phase of a run, the memory its components hold at the same time:

=========  ==============================================================================================
phase      components
=========  ==============================================================================================
load       runtime + model weights + loader transient (GGUF dequantisation, safetensors staging)
calibrate  runtime + weights + tokenising the calibration text (a stream source is tokenised whole:
           about 400 bytes per token while the tokenizer's encoding and the Python id list coexist)
allocate   runtime + weights + (OWL) dense activations and one block's Gram matrices
statistics runtime + weights + calibration activations (inputs and outputs of the current block, in the
           model's dtype) + one block's forward intermediates + its Gram sums (float64 ``in x in`` per shared
           input while the windows are added, rounded to float32 one input at a time)
prune      runtime + weights + calibration activations + one block's forward intermediates + its Gram
           matrices (float32) + the solver's workspace on its largest matrix
eval       runtime + weights + logits of one evaluation window (float32 ``seqlen x vocab``, x3 for the loss)
save       runtime + weights + serialisation buffer
reload     runtime + weights + the reloaded copy the reload check compares against (+ its loader transient)
=========  ==============================================================================================

On a CUDA device the weights stay on the host and the block, activations, Gram matrices and workspace are
planned for the device instead (plus the CUDA context). With ``offload_activations`` the calibration
activations of the prune phase are planned on the host and the device holds one window's input and output
instead, in OWL's input-norm pass (the allocate phase) as in the pruning passes. With ``offload_dir`` they are
planned on disk and memory holds one window's input and output (on the device, or on the host on the CPU).
"runtime" is measured: the
resident size of this process once the modules a run imports are loaded.

:func:`check_fits` stops a run before it loads anything when the host peak exceeds the available host memory,
or, on CUDA, when the device peak exceeds the device's free memory; the one-line message names what to change.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ConfigError, Job, PruneConfig
from ..gram_sum import GRAM_ROWS, lower_words
from ..registry import BLOCK_METHODS, REFINERS, SOLVERS, block_method_of

MiB = 2**20
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
#: Extra host memory while loading, as a fraction of the weights (measured on SmolLM2-135M; see bench/memory.py).
LOAD_TRANSIENT = {"gguf": 0.45, "dir": 0.25}
#: Peak bytes per token while a text is tokenised in one call (Rust encoding + Python list; measured ~390).
TOKENISE_BYTES = 400
CUDA_CONTEXT = 500 * MiB
#: Name prefix of the plan's calibration-activation components (the advice looks for them).
ACTIVATIONS = "calibration activations"


@dataclass
class Component:
    name: str
    bytes: float
    phases: tuple[str, ...]
    where: str = "host"  # or "device", or "disk" (not part of either peak)


@dataclass
class MemoryPlan:
    model: str
    summary: dict[str, Any]
    device: str
    components: list[Component] = field(default_factory=list)

    PHASES = ("load", "calibrate", "allocate", "statistics", "prune", "eval", "save", "reload")

    def add(self, name: str, nbytes: float, phases: tuple[str, ...] | str = PHASES, where: str = "host") -> None:
        phases = (phases,) if isinstance(phases, str) else tuple(phases)
        self.components.append(Component(name, float(nbytes), phases, where))

    def phase_total(self, phase: str, where: str = "host") -> float:
        return sum(c.bytes for c in self.components if phase in c.phases and c.where == where)

    def peak(self, where: str = "host") -> tuple[str, float]:
        """``(phase, bytes)`` of the largest phase."""
        return max(((p, self.phase_total(p, where)) for p in self.PHASES), key=lambda t: t[1])

    def to_dict(self) -> dict[str, Any]:
        out = {
            "model": self.model, **self.summary, "device": self.device,
            "components_mib": {c.name: round(c.bytes / MiB, 1) for c in self.components},
            "phases_mib": {p: round(self.phase_total(p) / MiB, 1) for p in self.PHASES},
            "peak_host_mib": round(self.peak()[1] / MiB, 1),
            "peak_phase": self.peak()[0],
        }
        if self.device != "cpu":
            out["peak_device_mib"] = round(self.peak("device")[1] / MiB, 1)
        return out

    def table(self) -> str:
        s = self.summary
        lines = [
            f"memory plan for {self.model}: {s['model_type']}, {s['blocks']} blocks, {s['parameters'] / 1e6:.1f}M "
            f"parameters in {s['dtype']}; {s['method']} on {self.device}, {s['nsamples']} x {s['seqlen']} tokens"
            + (", activations offloaded to the host" if s.get("offload_activations") and self.device != "cpu" else "")
            + (f"; per rank of {s['world_size']}" if s.get("world_size", 1) > 1 else ""),
            f"{'component':48s} {'where':6s} {'phases':32s} {'MiB':>10s}",
        ]
        for c in self.components:
            phases = "all" if c.phases == self.PHASES else ",".join(c.phases)
            lines.append(f"{c.name:48s} {c.where:6s} {phases:32s} {c.bytes / MiB:10.1f}")
        for where in ("host", "device") if self.device != "cpu" else ("host",):
            phase, peak = self.peak(where)
            lines.append(f"estimated peak {where} memory: {peak / MiB:.0f} MiB (during {phase})")
        disk = sum(c.bytes for c in self.components if c.where == "disk")
        if disk:
            lines.append(f"disk space for offloaded activations: {disk / MiB:.0f} MiB")
        import psutil

        lines.append(f"host memory available now: {psutil.virtual_memory().available / MiB:.0f} MiB")
        return "\n".join(lines)

    def advice(self, where: str = "host") -> str:
        """What to change to lower the peak of ``where`` ("host" or "device"), for the phase that sets it."""
        phase, _ = self.peak(where)
        offload = bool(self.summary.get("offload_activations"))
        half = self.summary.get("dtype") in ("float16", "bfloat16")
        if where == "host":
            tips = ["lower --nsamples or --seqlen (calibration activations grow with both)"]
            if phase in ("allocate", "statistics", "prune") and not self.summary.get("offload_dir"):
                tips.append("use --offload-dir DIR (keeps them in files)")
            if not half:
                tips.append("use --dtype bfloat16")
            if self.device == "cpu":
                tips.append("prune on --device cuda")
            elif offload and phase in ("allocate", "statistics", "prune"):
                tips.append("drop --offload-activations (the activations then live on the device)")
            return ", ".join(tips) + ", or skip --eval"
        if phase == "eval":
            return ("evaluation moves the whole model to the device: skip --eval and evaluate afterwards with "
                    "lmprune eval --device cpu, or prune on a device with more free memory")
        tips = []
        on_device = [c for c in self.components if c.where == "device" and phase in c.phases]
        if any(c.name.startswith(ACTIVATIONS) for c in on_device):
            tips.append("use --offload-activations (keeps the calibration activations on the host)")
        tips.append("lower --nsamples or --seqlen")
        if not half:
            tips.append("use --dtype bfloat16")
        return ", ".join(tips) + ", or prune on --device cpu"


def _meta_model(config: Any, trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def runtime_bytes() -> float:
    """Resident size of this process after importing what a run imports (torch, transformers, lmprune)."""
    import psutil

    for name in ("lmprune.pipeline", "lmprune.report.plots", "safetensors.torch"):
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    return float(psutil.Process().memory_info().rss)


@dataclass(frozen=True)
class BlockTokens:
    """The calibration tokens one block sees and its widths: hidden size ``d``, feed-forward width ``d_ff``."""

    tokens: int
    d: int
    d_ff: int


def _solver_workspace(config: PruneConfig, out: int, inp: int, sizes: BlockTokens) -> float:
    """float32 bytes the solver, refiner and block method hold beyond their inputs for one ``out x in`` matrix
    (their registry entries say how much), with the block method's own token arrays."""
    tokens, d_ff = sizes.tokens, sizes.d_ff
    words = 2 * out * inp  # the engine's dense clone and the float32 copy handed to the solver
    method = BLOCK_METHODS.get(block_method_of(config.method))
    for plugin in (SOLVERS.get(config.solver_name), REFINERS.get(config.refine), method):
        offloaded = config.offload_dir is not None and plugin.offload_workspace is not None
        a, b, c = plugin.offload_workspace if offloaded else plugin.workspace
        words += a * inp * inp + b * out * inp + c * tokens * d_ff
    if method.chunk_workspace or method.token_rows or method.token_inputs:
        chunk = min(tokens, BLOCK_METHODS.options(method.name, config.block_method_options).chunk_tokens)
        held = chunk if config.offload_dir is not None else tokens  # in files: one chunk of each in memory
        words += method.chunk_workspace * chunk * d_ff
        words += held * (method.token_rows * d_ff + method.token_inputs * sizes.d)
    return 4.0 * words


def _token_rows_on_disk(config: PruneConfig, sizes: BlockTokens) -> float:
    """Bytes of a block method's token arrays kept in files under ``--offload-dir``."""
    if config.offload_dir is None:
        return 0.0
    method = BLOCK_METHODS.get(block_method_of(config.method))
    return 4.0 * sizes.tokens * (method.token_rows * sizes.d_ff + method.token_inputs * sizes.d)


def plan_memory(
    job: Job, model_config: Any, source_kind: str = "dir", runtime: float | None = None,
    text_tokens: dict[str, int] | None = None, world_size: int = 1,
) -> MemoryPlan:
    """Estimate the peak memory of ``job`` on a model with ``model_config``.

    ``text_tokens`` maps a stream text (the calibration source under "calib", evaluation datasets by name) to
    its token count, for the tokenisation transients; absent texts are left out of the plan. A streamed job
    plans the non-block weights plus one block, each block written as its own shard; its embeddings and head are
    not held while the blocks are pruned (statistics and prune phases). With ``world_size`` ranks
    the plan is one rank's: its share of the calibration windows (the largest), the whole block, its Gram
    matrices and one solve (SparseLLM's FFN problem gathers every rank's tokens on each).
    """
    from ..models.adapters import get_adapter
    from ..models.declared import use_adapter_file
    from ..models.loading import declared_dtype, default_seqlen

    config, model_spec, stream = job.config, job.model, job.stream
    eval_datasets, eval_seqlen = job.evaluation.datasets, job.evaluation.seqlen
    model = _meta_model(model_config, job.trust_remote_code)
    use_adapter_file(model, job.adapter)
    adapter = get_adapter(model)
    blocks = adapter.blocks(model)
    if job.dtype == "auto":
        tdtype = torch.float32 if source_kind in ("gguf", "alias") else declared_dtype(model_config)
    else:
        tdtype = _DTYPES[job.dtype]
    width = torch.finfo(tdtype).bits // 8
    n_params = sum(p.numel() for p in model.parameters())
    weights = n_params * width
    block_params = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    seqlen = config.seqlen or default_seqlen(model_config)
    n, d = config.nsamples, int(model_config.hidden_size)
    tokens = n * seqlen
    heads = int(getattr(model_config, "num_attention_heads", 1))
    vocab = int(model_config.vocab_size)
    largest = max(blocks, key=lambda b: sum(p.numel() for p in b.parameters()))  # blocks may differ (MoE)
    linears = adapter.linears(largest)
    d_ff = max(lin.out_features for lin in linears.values())
    sizes = BlockTokens(tokens, d, d_ff)
    leaders = [r for g in adapter.groups for r in g[:1] if r in linears]
    gram_sizes = [linears[r].in_features for r in leaders]
    held = [max(i * i + i for i in gram_sizes)] if config.sequential else [i * i + i for i in gram_sizes]
    # float64 lower-triangle sums (gram_sum.GramSum) and Σx, the float32 matrix of one of them while it is rounded,
    # and one window's float32 product panel
    sums = [lower_words(i) + i for i in gram_sizes]
    gram_sums = (8.0 * (max(sums) if config.sequential else sum(sums)) + 4.0 * max(held)
                 + 4.0 * max(min(GRAM_ROWS, i) * i for i in gram_sizes))
    layerwise = block_method_of(config.method) == "layerwise"
    if layerwise:
        peak = _largest_solve(config, adapter.groups, linears, sizes, world_size, width)
    else:
        work = max(_solver_workspace(config, lin.out_features, lin.in_features, sizes)
                   for lin in linears.values())
        # no Gram matrix outside the FFN problem is alive while it is solved (the attention's went with their solves,
        # the error reports' are formed after it; checked on a run): its own are in its fitted workspace
        peak = _Solve("the FFN problem", 0.0, work, 0.0)
    n_rank = -(-n // max(1, world_size))  # the largest share of the windows
    activations = 2.0 * n_rank * seqlen * d * width
    forward = _forward_bytes(getattr(model.config, "_attn_implementation", None), heads, seqlen, d, d_ff, width)

    on_device = config.device != "cpu"
    where = "device" if on_device else "host"
    plan = MemoryPlan(model_spec, {
        "model_type": model_config.model_type, "blocks": len(blocks), "parameters": n_params,
        "dtype": str(tdtype).removeprefix("torch."), "method": config.method, "nsamples": n, "seqlen": seqlen,
        "offload_activations": config.offload_activations, "offload_dir": config.offload_dir,
        "world_size": world_size,
    }, config.device)
    plan.add("runtime (Python, torch, transformers)", runtime_bytes() if runtime is None else runtime)
    block_bytes = block_params * width
    if stream:
        outer = _embeddings_and_head(model) * width  # parked while the blocks are pruned
        plan.add("embeddings and head (not held while pruning)", outer,
                 tuple(p for p in plan.PHASES if p not in ("statistics", "prune")))
        plan.add("other non-block weights (norms)", weights - len(blocks) * block_bytes - outer)
        plan.add("one block's weights", block_bytes, ("statistics", "prune", "save", "reload"))
        # each written shard is read back a tensor at a time: the embedding or head, or a block's largest matrix
        plan.add("the largest tensor read back (each shard's write)",
                 max(p.numel() for p in model.parameters()) * width, ("save", "reload"))
    else:
        plan.add("model weights", weights)
        kind = "gguf" if source_kind in ("gguf", "alias") else "dir"
        plan.add(f"loader transient ({kind})", LOAD_TRANSIENT[kind] * n_params * 4, "load")
    text_tokens = text_tokens or {}
    if text_tokens.get("calib"):
        plan.add(f"calibration tokenisation ({text_tokens['calib']} tokens)", TOKENISE_BYTES * text_tokens["calib"],
                 "calibrate")
    prune = ("allocate", "statistics", "prune") if config.allocation == "owl" else ("statistics", "prune")
    act_name = f"{ACTIVATIONS} (2 x {n_rank} x {seqlen} x {d})"
    if config.offload_dir is not None:
        plan.add(f"{act_name}, on disk", activations, prune, "disk")
        if rows_on_disk := _token_rows_on_disk(config, sizes):
            plan.add(f"{config.method}'s token arrays (tokens x {d_ff}, tokens x {d}), on disk", rows_on_disk,
                     "prune", "disk")
        plan.add(f"one window's input and output (from {config.offload_dir})", 2.0 * seqlen * d * width, prune,
                 where)
    elif on_device and config.offload_activations:
        plan.add(f"{act_name}, offloaded", activations, prune, "host")
        plan.add("one window's input and output on the device", 2.0 * seqlen * d * width, prune, "device")
    else:
        plan.add(act_name, activations, prune, where)
    plan.add("block forward intermediates (one window)", forward, prune, where)
    plan.add("Gram sums of one block (float64)", gram_sums, "statistics", where)
    if peak.grams:
        plan.add(f"Gram matrices held at the largest solve ({peak.role}, float32)", peak.grams, "prune", where)
    plan.add(f"solver workspace ({config.solver_name if layerwise else config.method}, {peak.role})", peak.work,
             "prune", where)
    if peak.results:
        plan.add("results held until their broadcast (pruned weights)", peak.results, "prune", where)
    if on_device:
        plan.add("one block's weights", block_params * width, ("statistics", "prune"), "device")
        plan.add("CUDA context", CUDA_CONTEXT, ("statistics", "prune", "eval"), "device")
    if eval_datasets:
        L = eval_seqlen or seqlen
        plan.add(f"evaluation logits ({L} x {vocab}, float32, x3)", 12.0 * L * vocab, "eval", where)
        biggest = max((text_tokens.get(ds, 0) for ds in eval_datasets), default=0)
        if biggest:
            plan.add(f"evaluation tokenisation ({biggest} tokens)", TOKENISE_BYTES * biggest, "eval")
        if on_device:
            plan.add("model weights on the device for evaluation", weights, "eval", "device")
    if not stream:
        plan.add("serialisation buffer", weights, "save")
        plan.add("reload check copy (+ loader transient)", weights + LOAD_TRANSIENT["dir"] * n_params * 4, "reload")
    return plan


@dataclass
class _Solve:
    """What one rank holds while it solves one matrix (``role``): bytes of Gram matrices, workspace, results."""

    role: str
    grams: float
    work: float
    results: float

    @property
    def total(self) -> float:
        return self.grams + self.work + self.results


def _largest_solve(config: PruneConfig, groups, linears: dict, sizes: BlockTokens, world_size: int,
                   width: int) -> _Solve:
    """The solve of the layer-wise method at which one rank holds the most, as ``strategies.layerwise`` runs it.

    Its Gram matrices are collected for a stage (the whole block, or one input group with ``sequential``). In one
    process each matrix is solved and committed in turn, and a group's Gram matrix is released once its last
    matrix is: while ``down_proj`` is solved only its own is held. With several ranks a rank receives only the
    Gram matrices of the groups it solves a matrix of (``assign_owners`` by ``solve_cost``), and solves all its
    matrices before the results are broadcast in order, so it holds those Gram matrices through all its solves,
    and its earlier results (weights in the model's dtype, ``width`` bytes) through its later ones."""
    from ..distributed import assign_owners
    from ..strategies.layerwise import solve_cost

    groups = [[r for r in g if r in linears] for g in groups]
    groups = [g for g in groups if g]
    stages = [[g] for g in groups] if config.sequential else [groups]
    best = _Solve("", 0.0, 0.0, 0.0)
    for stage in stages:
        roles = [r for g in stage for r in g]
        last_reader = [roles.index(g[-1]) for g in stage]
        gram = [4.0 * (linears[g[0]].in_features ** 2 + linears[g[0]].in_features) for g in stage]
        owners = dict(zip(roles, assign_owners([solve_cost(linears[r]) for r in roles], world_size)))
        held = [0.0] * world_size
        for p, role in enumerate(roles):
            lin, rank = linears[role], owners[role]
            if world_size == 1:
                alive = sum(b for b, last in zip(gram, last_reader) if last >= p)
            else:
                alive = sum(b for b, g in zip(gram, stage) if any(owners[r] == rank for r in g))
            here = _Solve(role, alive, _solver_workspace(config, lin.out_features, lin.in_features, sizes),
                          held[rank])
            if here.total > best.total:
                best = here
            if world_size > 1:
                held[rank] += float(width) * lin.out_features * lin.in_features
    return best


def _forward_bytes(attn: str | None, heads: int, seqlen: int, d: int, d_ff: int, width: int) -> float:
    """One window through one block: hidden-size and FFN-width activations in the model's dtype (gate, up, the
    activation and the product for the FFN), plus, when the attention implementation ``attn`` (the model
    config's ``_attn_implementation``) is the eager one, its score matrices (scores, masked scores and
    probabilities in the model's dtype, and a float32 softmax below float32). Fused attention kernels (SDPA,
    flash) never form them: at LLaMA-2-7B's block shape, 2048 tokens, bf16, one window took 199 MiB with SDPA
    against 1409 MiB eager (``bench/scale/forward_memory.py``)."""
    eager = attn in (None, "eager")
    per_score = 3 * width + (4 if width < 4 else 0)  # scores, masked scores, probabilities (+ a float32 softmax)
    scores = heads * seqlen * seqlen * per_score if eager else 0
    return float(scores + width * (6 * seqlen * d + 4 * seqlen * d_ff))


def _embeddings_and_head(model: torch.nn.Module) -> int:
    """Parameters of the input embeddings and the head (a tied head's counted once)."""
    from ..models.discovery import embeddings_and_head

    modules = embeddings_and_head(model).values()
    return sum(p.numel() for p in {id(p): p for m in modules for p in m.parameters()}.values())


class InsufficientMemory(ConfigError):
    """The run's estimated peak does not fit in the memory available now."""


def plan_for_job(job: Job, world_size: int = 1) -> MemoryPlan:
    """:func:`plan_memory` for a job (one rank's of ``world_size``), reading only its model's configuration and
    tokenizer."""
    from ..models.loading import load_config, resolve

    source = resolve(job.model)
    cfg = load_config(job.model, job.trust_remote_code)
    texts = {"calib": job.config.calib, **{ds: ds for ds in job.evaluation.datasets}}
    return plan_memory(job, cfg, source.kind, text_tokens=_stream_tokens(job, texts), world_size=world_size)


def _stream_tokens(job: Job, texts: dict[str, str]) -> dict:
    """Token counts of the stream texts a run tokenises whole, from the tokenizer's rate on a 50k-char sample."""
    from ..data.sources import DataError, load_source
    from ..models.loading import ModelLoadError, load_tokenizer

    try:
        tok = load_tokenizer(job.model, job.trust_remote_code)
    except ModelLoadError:
        return {}
    out = {}
    for key, spec in texts.items():
        if key == "calib" and spec == "c4":
            continue  # C4 calibration samples single documents
        try:
            text = load_source(spec, "calib" if key == "calib" else "eval", job.config.data_dir)
        except (DataError, OSError):
            continue
        if not text.stream and key == "calib":
            continue  # documents are tokenised one at a time
        joined = text.joined()
        sample = joined[:50_000]
        if sample:
            per_char = len(tok(sample, add_special_tokens=False)["input_ids"]) / len(sample)
            out[key] = int(per_char * len(joined))
    return out


def device_free_bytes(device: str) -> float | None:
    """Free memory on a CUDA ``device`` now (``torch.cuda.mem_get_info``); None on the CPU or without CUDA."""
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    return float(free)


def check_fits(plan: MemoryPlan, current_rss: float | None = None, device_free: float | None = None,
               ranks_here: int = 1) -> None:
    """Raise :class:`InsufficientMemory` with the estimate and what to change when the host cannot hold the plan,
    or, for a CUDA device, when its planned peak exceeds the device's free memory (``device_free``, default
    :func:`device_free_bytes`; without CUDA there is nothing to compare and the run reports that itself).

    ``ranks_here`` processes of this plan share the host (torchrun's ``LOCAL_WORLD_SIZE``): each adds its peak
    beyond what it holds now (``current_rss``; 0 for processes not started yet)."""
    import psutil

    rss = psutil.Process().memory_info().rss if current_rss is None else current_rss
    phase, peak = plan.peak()
    available = psutil.virtual_memory().available
    ranks_here = max(1, int(ranks_here))
    if (peak - rss) * ranks_here > available:
        what = (f"estimated peak memory {peak / MiB:.0f} MiB" if ranks_here == 1 else
                f"estimated peak memory {peak / MiB:.0f} MiB per rank x {ranks_here} ranks on this machine")
        raise InsufficientMemory(
            f"{what} (during {phase}) exceeds the {(available + rss * ranks_here) / MiB:.0f} MiB available; "
            f"{plan.advice('host')} (run with --dry-run for the breakdown, --skip-memory-check to try anyway)"
        )
    if plan.device == "cpu":
        return
    free = device_free_bytes(plan.device) if device_free is None else device_free
    if free is None:
        return
    phase, peak = plan.peak("device")
    if peak > free:
        raise InsufficientMemory(
            f"estimated peak {plan.device} memory {peak / MiB:.0f} MiB (during {phase}) exceeds the {free / MiB:.0f} "
            f"MiB free on it; {plan.advice('device')} (run with --dry-run for the breakdown, --skip-memory-check to "
            f"try anyway)"
        )
