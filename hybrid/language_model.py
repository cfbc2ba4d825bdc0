"""LanguageModel: the researcher's entry point. nnsight syntax; the experiment runs where the weights are.

    lm = LanguageModel("smollm2-135m", initial_peers=[...])     # without initial_peers: runs locally
    with lm.trace(prompts, placement="hybrid") as tracer:
        h = lm.model.layers[8].output
        h[1, 3, :] = h[0, 3, :]
        p = lm.lm_head.output[:, -1].softmax(-1)[1].save()
    p            # a plain tensor;  tracer.stats: bytes, round trips, compute seconds per node

Placements (see :mod:`hybrid.placements`): ``local``, ``hybrid`` (default with peers), ``centralized``, ``swarm``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from transformers import AutoTokenizer

from swarm.checkpoint import load_config, resolve_checkpoint
from swarm.model import SwarmModel
from swarm.remote_sequence import ClientConfig
from swarm.span_hook import install_dispatch
from swarm.stages import Span, SpanModel

from .errors import HybridError
from .ir import Graph
from .placements import PLACEMENTS, LocalRunner, SwarmRunner
from .tracing import ModelSkeleton, Tracer, nnsight_position_ids, root_envoy


class LanguageModel:
    """A decoder LM you can trace. Module envoys (``lm.model.layers[3].mlp``) mirror the transformers tree."""

    def __init__(self, model: str = "smollm2-135m", initial_peers: Sequence[str] | None = None, *,
                 cache_dir: Path | None = None, client_config: ClientConfig = ClientConfig(),
                 dtype: torch.dtype = torch.float32):
        self.path = resolve_checkpoint(model, cache_dir)
        self.config = load_config(self.path)
        self.dtype = dtype
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.skeleton = ModelSkeleton(self.config)
        self._envoy = root_envoy(self.skeleton)
        self.initial_peers = list(initial_peers or [])
        self.client_config = client_config
        self._client: SwarmModel | None = None
        self._local: SpanModel | None = None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._envoy, name)

    # ---- connections ------------------------------------------------------------------------------------

    @property
    def client(self) -> SwarmModel:
        """The swarm connection (opened on first use)."""
        if self._client is None:
            if not self.initial_peers:
                raise HybridError("This LanguageModel has no initial_peers; only placement='local' is available.")
            client = SwarmModel.from_pretrained(str(self.path), self.initial_peers, client_config=self.client_config,
                                                dtype=self.dtype)
            install_dispatch(client.local)
            self._client = client
        return self._client

    @property
    def local_model(self) -> SpanModel:
        """The whole model in this process (loaded on first use; the ``local`` placement)."""
        if self._local is None:
            model = SpanModel.load(self.path, Span(0, self.config.num_hidden_layers, embed=True, head=True),
                                   dtype=self.dtype)
            install_dispatch(model)
            self._local = model
        return self._local

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "LanguageModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- tracing ----------------------------------------------------------------------------------------

    def trace(self, inputs: Any = None, *, placement: str | None = None) -> Tracer:
        """A tracing context. ``inputs``: prompt(s) or token ids for one implicit invoke, or None to use
        ``tracer.invoke(...)``. ``placement`` defaults to ``hybrid`` with initial peers, else ``local``."""
        placement = placement or ("hybrid" if self.initial_peers else "local")
        if placement not in PLACEMENTS:
            raise HybridError(f"placement must be one of {PLACEMENTS}; got {placement!r}.")
        box: list[Tracer] = []

        def execute(graph: Graph, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[int, Any]:
            saves, stats = self.run_graph(graph, input_ids, attention_mask, placement=placement)
            box[0].stats = stats.as_dict()
            return saves

        tracer = Tracer(self.skeleton, self.tokenize, execute, inputs)
        box.append(tracer)
        return tracer

    def run_graph(self, graph: Graph, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
                  placement: str = "hybrid"):
        """Run a recorded graph on a batch in ``placement``; returns ``(saved values by node id, TraceStats)``."""
        events = self.skeleton.shapes(input_ids, attention_mask).events
        positions = nnsight_position_ids(attention_mask) if attention_mask is not None else None
        if placement == "local":
            return LocalRunner(self.local_model).run(graph, events, input_ids, attention_mask, positions)
        return SwarmRunner(self.client).run(placement, graph, events, input_ids, attention_mask, positions)

    def tokenize(self, rows: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts or token-id lists → left-padded ``(input_ids, attention_mask)``, as nnsight batches them."""
        if isinstance(rows, str):
            rows = [rows]
        if isinstance(rows, torch.Tensor):
            ids = rows if rows.ndim == 2 else rows.unsqueeze(0)
            return ids.long(), torch.ones_like(ids, dtype=torch.long)
        if rows and all(isinstance(r, str) for r in rows):
            encoded = self.tokenizer(list(rows), padding=True, return_tensors="pt")
            return encoded["input_ids"], encoded["attention_mask"]
        rows = [list(r) for r in rows]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return ids, mask
