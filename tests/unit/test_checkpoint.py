"""Resolving --model fails with typed, actionable errors; TensorIndex reads exactly the tensors asked for; the hash
identifies the weights and is cached."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from swarm.checkpoint import (
    HASH_CACHE_FILE,
    INDEX_FILE,
    TensorIndex,
    checkpoint_hash,
    load_config,
    resolve_checkpoint,
)
from swarm.errors import ModelNotFoundError
from tests.tiny_checkpoints import FAMILIES


def full_state_dict(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    return state


# --- resolve_checkpoint / load_config ---------------------------------------------------------------------------


def test_resolve_accepts_single_file_and_sharded_dirs(tiny_checkpoint_factory):
    for shard in (False, True):
        path = tiny_checkpoint_factory("llama", shard=shard)
        assert resolve_checkpoint(str(path)) == path.resolve()
    assert (tiny_checkpoint_factory("llama", shard=True) / INDEX_FILE).is_file()


def test_resolve_unknown_name_lists_aliases_and_requirements(tmp_path):
    with pytest.raises(ModelNotFoundError) as info:
        resolve_checkpoint(str(tmp_path / "no-such-model"))
    assert "smollm2-135m" in info.value.message
    assert "config.json" in info.value.message and "model.safetensors" in info.value.message
    assert info.value.code == "model_not_found"


def test_resolve_rejects_dir_without_config(tmp_path, tiny_checkpoint_factory):
    shutil.copy(tiny_checkpoint_factory("llama") / "model.safetensors", tmp_path)
    with pytest.raises(ModelNotFoundError, match="config.json"):
        resolve_checkpoint(str(tmp_path))


def test_resolve_rejects_bin_only_checkpoint_asking_for_safetensors(tmp_path, tiny_checkpoint_factory):
    shutil.copy(tiny_checkpoint_factory("llama") / "config.json", tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(ModelNotFoundError, match="safetensors is required"):
        resolve_checkpoint(str(tmp_path))


def test_resolve_rejects_a_file(tmp_path):
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")
    with pytest.raises(ModelNotFoundError, match="is a file"):
        resolve_checkpoint(str(file))


def test_load_config_reads_family(tiny_checkpoint_factory, tmp_path):
    for family in FAMILIES:
        config = load_config(tiny_checkpoint_factory(family))
        assert config.model_type == family and config.num_hidden_layers == 4
    with pytest.raises(ModelNotFoundError):
        load_config(tmp_path)


# --- TensorIndex ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shard", [False, True])
def test_tensor_index_loads_only_requested_names(tiny_checkpoint_factory, shard):
    path = tiny_checkpoint_factory("qwen2", shard=shard)
    index = TensorIndex.open(path)
    full = full_state_dict(path)
    assert sorted(index.names()) == sorted(full)

    wanted = [n for n in index.names() if n.startswith("model.layers.1.")] + ["model.norm.weight"]
    loaded = index.load(wanted)
    assert list(loaded) == wanted
    for name in wanted:
        assert torch.equal(loaded[name], full[name])
    assert index.nbytes(wanted) == sum(t.numel() * t.element_size() for t in loaded.values())
    assert index.nbytes(index.names()) == sum(t.numel() * t.element_size() for t in full.values())
    assert 0 < index.nbytes(wanted) < index.nbytes(index.names()) / 3


def test_tensor_index_casts_dtype_and_dedupes(tiny_checkpoint_factory):
    index = TensorIndex.open(tiny_checkpoint_factory("llama"))
    loaded = index.load(["model.norm.weight", "model.norm.weight"], dtype=torch.bfloat16)
    assert list(loaded) == ["model.norm.weight"] and loaded["model.norm.weight"].dtype == torch.bfloat16


def test_tensor_index_names_missing_tensors(tiny_checkpoint_factory):
    index = TensorIndex.open(tiny_checkpoint_factory("llama", tie_embeddings=True))
    assert "lm_head.weight" not in index.names()  # tied: only the embedding is stored
    with pytest.raises(ModelNotFoundError, match="lm_head.weight"):
        index.load(["model.norm.weight", "lm_head.weight"])
    with pytest.raises(ModelNotFoundError, match="model.layers.99"):
        index.nbytes(["model.layers.99.mlp.up_proj.weight"])


def test_tensor_index_open_does_no_io_in_constructor_and_rejects_missing_weights(tmp_path):
    index = TensorIndex(root=tmp_path, tensors={})  # plain data: nothing is read
    assert index.names() == []
    with pytest.raises(ModelNotFoundError, match="model.safetensors"):
        TensorIndex.open(tmp_path)


def test_tensor_index_rejects_corrupt_header(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(ModelNotFoundError, match="header"):
        TensorIndex.open(tmp_path)


# --- checkpoint_hash --------------------------------------------------------------------------------------------


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    (dst / HASH_CACHE_FILE).unlink(missing_ok=True)
    return dst


def test_hash_is_stable_and_cached(tiny_checkpoint_factory, tmp_path):
    path = copy_checkpoint(tiny_checkpoint_factory("llama", shard=True), tmp_path / "ckpt")
    first = checkpoint_hash(path)
    assert len(first) == 64 and int(first, 16) >= 0
    assert (path / HASH_CACHE_FILE).is_file()
    assert checkpoint_hash(path) == first
    # A copy (other mtimes, no cache) hashes the same.
    assert checkpoint_hash(copy_checkpoint(path, tmp_path / "copy")) == first


def test_hash_cache_hit_does_not_read_weights(tiny_checkpoint_factory, tmp_path):
    path = copy_checkpoint(tiny_checkpoint_factory("llama"), tmp_path / "ckpt")
    first = checkpoint_hash(path)
    cache = json.loads((path / HASH_CACHE_FILE).read_text())
    cache["sha256"] = "f" * 64  # a planted value proves the second call trusts the cache
    (path / HASH_CACHE_FILE).write_text(json.dumps(cache))
    assert checkpoint_hash(path) == "f" * 64
    # Touching a file invalidates the cache entry.
    stat = (path / "model.safetensors").stat()
    os.utime(path / "model.safetensors", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert checkpoint_hash(path) == first


def test_hash_changes_when_weights_change(tiny_checkpoint_factory, tmp_path):
    path = copy_checkpoint(tiny_checkpoint_factory("llama"), tmp_path / "ckpt")
    before = checkpoint_hash(path)
    state = load_file(path / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"].clone()
    state["model.norm.weight"][0] += 1e-3
    time.sleep(0.01)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    assert checkpoint_hash(path) != before
    other_seed = tiny_checkpoint_factory("llama", seed=1)
    assert checkpoint_hash(copy_checkpoint(other_seed, tmp_path / "seed1")) != before


def test_hash_works_when_cache_cannot_be_written(tiny_checkpoint_factory, tmp_path, monkeypatch):
    path = copy_checkpoint(tiny_checkpoint_factory("mistral"), tmp_path / "ckpt")
    expected = checkpoint_hash(copy_checkpoint(path, tmp_path / "writable"))

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(os, "replace", read_only)  # what a read-only directory does to the cache write
    assert checkpoint_hash(path) == expected
    assert not (path / HASH_CACHE_FILE).exists()
    assert [p.name for p in path.iterdir() if p.name.startswith(HASH_CACHE_FILE)] == []


def test_hash_requires_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError):
        checkpoint_hash(tmp_path)
