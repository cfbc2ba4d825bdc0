"""LanguageModel: the researcher's entry point. nnsight syntax; the experiment runs where the weights are.

    lm = LanguageModel("smollm2-135m", initial_peers=[...])     # without initial_peers: runs locally
    with lm.trace(prompts, placement="hybrid") as tracer:
        h = lm.model.layers[8].output
        h[1, 3, :] = h[0, 3, :]
        p = lm.lm_head.output[:, -1].softmax(-1)[1].save()
    p            # a plain tensor;  tracer.stats: bytes, round trips, compute seconds per node

    with lm.generate(prompt, max_new_tokens=5) as tracer:     # per-step interventions
        for step in tracer.iter[:5]:                            # tracer.all() would end the block (as nnsight)
            lm.model.layers[8].output[:, -1] += steer
        ids = tracer.result.save()

Placements (see :mod:`hybrid.placements`): ``local``, ``hybrid`` (default with peers), ``centralized``, ``swarm``.
"""

from __future__ import annotations

import time
from functools import cached_property
from pathlib import Path
from typing import Any, Sequence

import torch

from swarm.checkpoint import load_config, resolve_checkpoint
from swarm.model import SwarmModel
from swarm.remote_sequence import ClientConfig
from swarm.span_hook import install_dispatch
from swarm.stages import Span, SpanModel
from swarm.tokens import checkpoint_stop_tokens, load_tokenizer

from .edits import STAND_IN, Edit, EditContext, apply_edits, scan_execute
from .errors import HybridError
from .generation import GenerateOptions, SwarmSteps, generate, local_stepper
from .session import Session
from .ir import Graph
from .placements import PLACEMENTS, LocalRunner, SwarmRunner
from .source_view import instrument_for
from .request import NO_LINKS, SessionLinks
from .steps import Generator
from .tracing import ModelSkeleton, Tracer, current_tracer, nnsight_position_ids, root_envoy


class LanguageModel:
    """A decoder LM you can trace. Module envoys (``lm.model.layers[3].mlp``) mirror the transformers tree."""

    def __init__(self, model: str = "smollm2-135m", initial_peers: Sequence[str] | None = None, *,
                 cache_dir: Path | None = None, client_config: ClientConfig = ClientConfig(),
                 dtype: torch.dtype = torch.float32, trim_head: bool = True):
        self.path = resolve_checkpoint(model, cache_dir)
        self.trim_head = trim_head
        """Run the head only on the positions a trace reads (``lm_head.output[:, -1]``; on by default): faster, and
        logits equal to a full-sequence head's bit for bit on CPU (see :func:`hybrid.node_plugin.last_rows_padded`);
        False runs the head on every position."""
        self.config = load_config(self.path)
        self.dtype = dtype
        self.tokenizer = load_tokenizer(self.path)
        """The checkpoint's own tokenizer (left padding; text inputs are tokenized with it), or None where the
        checkpoint has no tokenizer files (token ids only)."""
        self.skeleton = ModelSkeleton(self.config)
        self._envoy = root_envoy(self.skeleton)
        self.initial_peers = list(initial_peers or [])
        self.client_config = client_config
        self._client: SwarmModel | None = None
        self._local: SpanModel | None = None
        self._session: Session | None = None
        self._shared: LanguageModel | None = None
        """The model an edited copy (``lm.edit()``) shares its connection and weights with; None for the model."""
        self._edits: list[Edit] = []
        """Edit blocks every later trace starts with (``lm.edit()``, :mod:`hybrid.edits`)."""

    @property
    def generator(self) -> Generator:
        """nnsight's ``lm.generator``: ``lm.generator.output`` in ``lm.generate(...)`` is ``tracer.result``."""
        return Generator(lambda: current_tracer(self.skeleton))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._envoy, name)

    # ---- connections ------------------------------------------------------------------------------------

    @property
    def client(self) -> SwarmModel:
        """The swarm connection (opened on first use)."""
        if self._shared is not None:  # an edited copy (lm.edit()) uses the model's own
            return self._shared.client
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
        if self._shared is not None:
            return self._shared.local_model
        if self._local is None:
            model = SpanModel.load(self.path, Span(0, self.config.num_hidden_layers, embed=True, head=True),
                                   dtype=self.dtype)
            install_dispatch(model)
            self._local = model
        return self._local

    def close(self) -> None:
        if self._client is not None and self._shared is None:
            self._client.close()
            self._client = None

    def __enter__(self) -> "LanguageModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- tracing ----------------------------------------------------------------------------------------

    def _placement(self, placement: str | None) -> str:
        placement = placement or ("hybrid" if self.initial_peers else "local")
        if placement not in PLACEMENTS:
            raise HybridError(f"placement must be one of {PLACEMENTS}; got {placement!r}.")
        return placement

    def trace(self, inputs: Any = None, *, placement: str | None = None) -> Tracer:
        """A tracing context. ``inputs``: prompt(s) or token ids for one implicit invoke, or None to use
        ``tracer.invoke(...)``. ``placement`` defaults to ``hybrid`` with initial peers, else ``local``."""
        placement = self._placement(placement)
        box: list[Tracer] = []

        def run(graph: Graph, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                links: SessionLinks = NO_LINKS) -> dict[int, Any]:
            saves, stats = self.run_graph(graph, input_ids, attention_mask, placement=placement, links=links)
            box[0].stats = stats.as_dict()
            return saves

        return self._tracer(box, run, inputs, placement)

    def generate(self, inputs: Any = None, *, placement: str | None = None, **kwargs: Any) -> Tracer:
        """A tracing context around generation, as nnsight's ``lm.generate``: module reads and writes bind to step 0,
        or to each step in ``for step in tracer.iter[...]`` / ``tracer.all()``; ``tracer.result`` is the token ids.

        Args:
            kwargs: ``max_new_tokens`` (default 20), ``do_sample``, ``temperature``, ``top_k``, ``top_p``, ``seed``,
                ``eos_token_id`` (an id or a list; None never stops early) / ``pad_token_id`` (default: the
                checkpoint's EOS and end-of-turn tokens and its pad token, as :attr:`generation_defaults`).
        """
        placement = self._placement(placement)
        options = GenerateOptions.from_kwargs(kwargs, **self.generation_defaults)
        box: list[Tracer] = []

        def run(graph: Graph, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                links: SessionLinks = NO_LINKS) -> dict[int, Any]:
            tokens, values, stats = self.run_generation(graph, input_ids, attention_mask, options, placement=placement,
                                                        links=links)
            box[0].stats = stats.as_dict()
            box[0]._result.bind(tokens)
            return {k: v for k, v in values.items() if graph.nodes[k].save}

        return self._tracer(box, run, inputs, placement, steps=options.max_new_tokens, generation=True)

    def scan(self, inputs: Any = None) -> Tracer:
        """nnsight's ``lm.scan(inputs)``: trace as usual, but run nothing (no weights, no network): module values
        are fake (``meta``) tensors built from the config, so ``.shape`` / ``.dtype`` can be read, and saved values
        are meta tensors of the right shape. Edits apply, as in a trace."""
        box: list[Tracer] = []
        tracer = Tracer(self.skeleton, self.tokenize, scan_execute(box), inputs)
        apply_edits(tracer, self._edits)
        box.append(tracer)
        return tracer

    def edit(self, *, inplace: bool = False) -> EditContext:
        """nnsight's ``lm.edit()``: ``with lm.edit() as (tracer, edited):`` records the block's interventions once
        and every later trace of ``edited`` (a copy of this model sharing its connections and weights) starts with
        them; ``inplace=True`` edits this model (``with lm.edit(inplace=True) as tracer:``). See
        :mod:`hybrid.edits`."""
        target = self if inplace else self._edited_copy()
        context = EditContext(None, target, inplace)
        context.tracer = Tracer(self.skeleton, self.tokenize, context.store, STAND_IN)
        return context

    def clear_edits(self) -> None:
        """Drop every edit of this model (nnsight's ``clear_edits()``)."""
        self._edits = []

    def _edited_copy(self) -> "LanguageModel":
        copy = object.__new__(type(self))  # a subclass (the gateway's brokered model) keeps its methods
        copy.__dict__.update(self.__dict__)
        copy._edits = list(self._edits)
        copy._shared = self  # the lazily opened connection and weights are this model's
        return copy

    def session(self) -> Session:
        """Several traces as one experiment (nnsight's ``lm.session()``): they run when the block ends, in order,
        and a later trace may use values of an earlier one. See :mod:`hybrid.session`."""
        if self._session is not None and self._session.open:
            raise HybridError("sessions of one LanguageModel cannot be nested")
        self._session = Session(self)
        return self._session

    def _tracer(self, box: list, run, inputs: Any, placement: str, **kwargs: Any) -> Tracer:
        session = self._session if self._session is not None and self._session.open else None

        def execute(graph: Graph, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> dict[int, Any] | None:
            if session is None:
                return run(graph, input_ids, attention_mask)
            session.defer(box[0], placement, lambda links: run(graph, input_ids, attention_mask, links))
            return None

        tracer = Tracer(self.skeleton, self.tokenize, execute, inputs, **kwargs)
        apply_edits(tracer, self._edits)
        box.append(tracer)
        if session is not None:
            session.adopt(tracer)
        return tracer

    def run_generation(self, graph: Graph, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                       options: GenerateOptions, *, placement: str = "hybrid", links: SessionLinks = NO_LINKS):
        """Generate with a recorded graph in ``placement``; returns ``(tokens, values by node id, TraceStats)``."""
        instrument_for(self.skeleton, graph)  # module.source: the graph may come from another process
        events = self.skeleton.shapes(input_ids, attention_mask).events
        if placement == "local":
            t0 = time.perf_counter()
            step, stats = local_stepper(self.local_model, graph, events, links)
            tokens, values = generate(step, input_ids, attention_mask, options, links)
            stats.wall_s = time.perf_counter() - t0
            return tokens, values, stats
        batch, length = input_ids.shape
        with SwarmSteps(SwarmRunner(self.client), placement, graph, events, batch_size=batch,
                        max_length=length + options.max_new_tokens, links=links, greedy=not options.do_sample) as steps:
            tokens, values = generate(steps, input_ids, attention_mask, options, links)
        return tokens, values, steps.stats

    @cached_property
    def generation_defaults(self) -> dict:
        """EOS ids (the generation config's, the tokenizer's and end-of-turn markers: :mod:`swarm.tokens`) and the
        pad id of the checkpoint (read once)."""
        stop = checkpoint_stop_tokens(self.path, self.config, self.tokenizer)
        return {"eos_token_id": stop.eos or None, "pad_token_id": stop.pad}

    def run_graph(self, graph: Graph, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, *,
                  placement: str = "hybrid", links: SessionLinks = NO_LINKS):
        """Run a recorded graph on a batch in ``placement``; returns ``(saved values by node id, TraceStats)``."""
        instrument_for(self.skeleton, graph)  # module.source: the graph may come from another process
        events = self.skeleton.shapes(input_ids, attention_mask).events
        positions = nnsight_position_ids(attention_mask) if attention_mask is not None else None
        if placement == "local":
            return LocalRunner(self.local_model, self.trim_head).run(graph, events, input_ids, attention_mask, positions,
                                                                     links)
        return SwarmRunner(self.client, self.trim_head).run(placement, graph, events, input_ids, attention_mask,
                                                            positions, links)

    def tokenize(self, rows: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts or token-id lists → left-padded ``(input_ids, attention_mask)``, as nnsight batches them."""
        if isinstance(rows, str):
            rows = [rows]
        if isinstance(rows, torch.Tensor):
            ids = rows if rows.ndim == 2 else rows.unsqueeze(0)
            return ids.long(), torch.ones_like(ids, dtype=torch.long)
        if rows and all(isinstance(r, str) for r in rows):
            if self.tokenizer is None:
                raise HybridError(f"{self.path} has no tokenizer files; pass token ids instead of text")
            encoded = self.tokenizer(list(rows), padding=True, return_tensors="pt")
            return encoded["input_ids"], encoded["attention_mask"]
        rows = [list(r) for r in rows]
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer is not None else (self.config.pad_token_id or 0)
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], dtype=torch.long)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long)
        return ids, mask
