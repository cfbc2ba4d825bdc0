"""Resolving ``--model`` to a safetensors checkpoint directory, hashing it, and reading only some of its tensors.

A checkpoint directory holds ``config.json`` and either ``model.safetensors`` or ``model.safetensors.index.json``
with the shards it names (what ``save_pretrained`` writes). ``--model`` is such a directory or an alias of
:data:`swarm.embedded.EMBEDDED_MODELS`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import safetensors
import torch
import transformers
from tqdm.auto import tqdm

from .embedded import EMBEDDED_MODELS, prepare_embedded
from .errors import ModelNotFoundError

logger = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
HASH_CACHE_FILE = ".swarm-hash.json"
"""Written into the checkpoint directory by :func:`checkpoint_hash` (when writable)."""

_HASH_DOMAIN = b"swarm-checkpoint-sha256/1\0"
_CHUNK_BYTES = 8 << 20
_MAX_HEADER_BYTES = 100 << 20
_REQUIREMENTS = (
    f"a directory containing config.json and {SINGLE_FILE} (or {INDEX_FILE} and its shards), "
    "as written by transformers' save_pretrained(..., safe_serialization=True)"
)


def resolve_checkpoint(model: str, cache_dir: Path | None = None, progress: bool = False) -> Path:
    """Turn a ``--model`` argument into a checkpoint directory.

    Args:
        model: an alias of :data:`EMBEDDED_MODELS` (prepared on first use, see
            :func:`swarm.embedded.prepare_embedded`) or the path of a checkpoint directory.
        cache_dir: where embedded models are prepared; the default cache if None.
        progress: show progress on stderr while an embedded model is prepared.

    Raises:
        ModelNotFoundError: neither an alias nor a usable directory; the message says what is missing.

    Returns:
        The absolute checkpoint directory.
    """
    if model in EMBEDDED_MODELS:
        return prepare_embedded(model, cache_dir=cache_dir, progress=progress)
    path = Path(model).expanduser()
    aliases = ", ".join(sorted(EMBEDDED_MODELS))
    if not path.exists():
        raise ModelNotFoundError(
            f"--model {model!r} is neither a known alias ({aliases}) nor an existing path. Pass an alias or "
            f"{_REQUIREMENTS}."
        )
    if not path.is_dir():
        raise ModelNotFoundError(f"--model {model!r} is a file; pass an alias ({aliases}) or {_REQUIREMENTS}.")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{path} has no config.json; --model needs {_REQUIREMENTS}.")
    if not (path / SINGLE_FILE).is_file() and not (path / INDEX_FILE).is_file():
        if any(path.glob("*.bin")):
            raise ModelNotFoundError(
                f"{path} holds only PyTorch .bin weights; safetensors is required (a node reads just the "
                f"tensors of its span). Convert once: load it with transformers and call "
                f"save_pretrained(<dir>, safe_serialization=True)."
            )
        raise ModelNotFoundError(f"{path} has no {SINGLE_FILE} or {INDEX_FILE}; --model needs {_REQUIREMENTS}.")
    return path.resolve()


def load_config(path: Path) -> transformers.PretrainedConfig:
    """Read a checkpoint's ``config.json`` (local files only, never the hub).

    Raises:
        ModelNotFoundError: the config is missing or transformers cannot parse it.
    """
    try:
        return transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelNotFoundError(f"Cannot read the model config in {path}: {exc}") from exc


def checkpoint_hash(path: Path, progress: bool = False) -> str:
    """The identity of a checkpoint's weights: hex sha256 over ``config.json`` and every ``*.safetensors``.

    Files are taken in name order; each contributes its name, its size and its bytes (read in 8 MiB chunks).
    The digest is cached in ``<path>/.swarm-hash.json`` under the files' names, sizes and mtimes, so a second
    call costs a few ``stat`` calls; a directory that cannot be written is simply not cached.

    Args:
        path: a checkpoint directory.
        progress: show a tqdm bar over the hashed bytes on stderr.

    Raises:
        ModelNotFoundError: the directory has no config.json or no safetensors file.

    Returns:
        64 hex digits.
    """
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not (path / "config.json").is_file() or not files:
        raise ModelNotFoundError(f"Cannot hash {path}: it needs config.json and *.safetensors files.")
    files = [path / "config.json"] + files
    stats = [(f.name, f.stat()) for f in files]
    key = [[name, st.st_size, st.st_mtime_ns] for name, st in stats]
    cached = _read_hash_cache(path / HASH_CACHE_FILE, key)
    if cached is not None:
        return cached

    digest = hashlib.sha256(_HASH_DOMAIN)
    buffer = memoryview(bytearray(_CHUNK_BYTES))
    total = sum(st.st_size for _, st in stats)
    with tqdm(total=total, desc="hashing", unit="B", unit_scale=True, disable=not progress) as bar:
        for file, (name, st) in zip(files, stats):
            digest.update(f"{name}\0{st.st_size}\0".encode())
            with open(file, "rb") as handle:
                while n := handle.readinto(buffer):
                    digest.update(buffer[:n])
                    bar.update(n)
    hexdigest = digest.hexdigest()
    _write_hash_cache(path / HASH_CACHE_FILE, key, hexdigest)
    return hexdigest


def _read_hash_cache(cache: Path, key: list) -> str | None:
    try:
        record = json.loads(cache.read_text())
    except (OSError, ValueError):
        return None
    if isinstance(record, dict) and record.get("files") == key and isinstance(record.get("sha256"), str):
        return record["sha256"]
    return None


def _write_hash_cache(cache: Path, key: list, hexdigest: str) -> None:
    tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({"files": key, "sha256": hexdigest}))
        os.replace(tmp, cache)
    except OSError as exc:  # read-only checkpoint: hashing still worked, the next call just hashes again
        logger.debug("not caching the hash of %s: %s", cache.parent, exc)
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and how big it is, from a safetensors header."""

    file: str
    """File name inside the checkpoint directory."""
    dtype: str
    """safetensors dtype name, e.g. ``F32``."""
    shape: tuple[int, ...]
    nbytes: int
    """Bytes on disk."""


@dataclass(frozen=True)
class TensorIndex:
    """The tensors of a safetensors checkpoint, read selectively. Build with :meth:`open`."""

    root: Path
    """The checkpoint directory."""
    tensors: Mapping[str, TensorInfo]
    """Tensor name -> where it lives, in checkpoint order."""

    @classmethod
    def open(cls, path: Path) -> TensorIndex:
        """Read the headers (not the data) of ``model.safetensors`` or of every shard the index names.

        Raises:
            ModelNotFoundError: no safetensors weights, or an index/header that is unreadable or inconsistent.
        """
        root = Path(path)
        if (root / INDEX_FILE).is_file():
            try:
                weight_map = json.loads((root / INDEX_FILE).read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelNotFoundError(f"Cannot read {root / INDEX_FILE}: {exc}") from exc
            headers = {file: _read_header(root / file) for file in sorted(set(weight_map.values()))}
            tensors = {}
            for name, file in weight_map.items():
                if name not in headers[file]:
                    raise ModelNotFoundError(f"{INDEX_FILE} in {root} puts {name!r} in {file}, which lacks it.")
                tensors[name] = headers[file][name]
        elif (root / SINGLE_FILE).is_file():
            tensors = _read_header(root / SINGLE_FILE)
        else:
            raise ModelNotFoundError(
                f"{root} has no {SINGLE_FILE} or {INDEX_FILE}; a checkpoint needs {_REQUIREMENTS}."
            )
        return cls(root=root, tensors=tensors)

    def names(self) -> list[str]:
        """All tensor names."""
        return list(self.tensors)

    def nbytes(self, names: Iterable[str]) -> int:
        """Bytes on disk of the named tensors, from the headers.

        Raises:
            ModelNotFoundError: some names are not in the checkpoint.
        """
        return sum(self.tensors[name].nbytes for name in self._check(names))

    def load(self, names: Iterable[str], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Read only the named tensors (a node serving a third of the layers reads a third of the bytes).

        Args:
            names: tensor names; duplicates are read once.
            dtype: cast each tensor to this dtype if given.

        Raises:
            ModelNotFoundError: some names are not in the checkpoint (the message names them).

        Returns:
            name -> CPU tensor, in the order asked.
        """
        wanted = self._check(names)
        by_file: dict[str, list[str]] = {}
        for name in wanted:
            by_file.setdefault(self.tensors[name].file, []).append(name)
        loaded: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            with safetensors.safe_open(str(self.root / file), framework="pt", device="cpu") as handle:
                for name in file_names:
                    tensor = handle.get_tensor(name)
                    loaded[name] = tensor.to(dtype) if dtype is not None else tensor
        return {name: loaded[name] for name in wanted}

    def _check(self, names: Iterable[str]) -> list[str]:
        wanted = list(dict.fromkeys(names))
        missing = [name for name in wanted if name not in self.tensors]
        if missing:
            shown = ", ".join(repr(n) for n in missing[:8])
            if len(missing) > 8:
                shown += f" and {len(missing) - 8} more"
            raise ModelNotFoundError(
                f"Checkpoint {self.root} has no tensor {shown} (it has {len(self.tensors)} tensors, e.g. "
                f"{next(iter(self.tensors), None)!r}). Is it the model you meant, and complete?"
            )
        return wanted


def _read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse a safetensors header: 8 bytes little-endian length, then JSON (``__metadata__`` skipped)."""
    try:
        with open(file, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > _MAX_HEADER_BYTES:
                raise ValueError(f"header of {length} bytes exceeds {_MAX_HEADER_BYTES}")
            header = json.loads(handle.read(length))
        return {
            name: TensorInfo(
                file=file.name,
                dtype=entry["dtype"],
                shape=tuple(entry["shape"]),
                nbytes=entry["data_offsets"][1] - entry["data_offsets"][0],
            )
            for name, entry in header.items()
            if name != "__metadata__"
        }
    except (OSError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise ModelNotFoundError(f"Cannot read the safetensors header of {file}: {exc}") from exc
