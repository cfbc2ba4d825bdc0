"""SwarmModel: a causal LM whose decoder layers run on the swarm.

    model = SwarmModel.from_pretrained("smollm2-135m", initial_peers=[...])
    logits = model(input_ids).logits          # equal to local transformers
    ids = model.generate(input_ids, max_new_tokens=20)        # stops at the checkpoint's EOS / end of turn
    model.tokenizer                            # the checkpoint's own tokenizer

The embedding and head run locally by default (as in Petals); with ``remote_stages=True`` they run on nodes that
serve them. Gradients flow through the swarm when inputs require grad (``model(inputs_embeds=x)``).
"""

from __future__ import annotations

import atexit
import functools
import logging
import weakref
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from hivemind.dht import DHT

from ._loop import BackgroundLoop
from .checkpoint import checkpoint_hash, load_config, resolve_checkpoint
from .inference_session import InferenceSession
from .record_validation import swarm_dht
from .records import model_key
from .remote_sequence import ClientConfig, RemoteSequence
from .routing import RouteTable
from .stages import Span, SpanModel
from .tokens import StopTokens, checkpoint_stop_tokens, load_tokenizer

logger = logging.getLogger(__name__)


@dataclass
class CausalLMOutput:
    logits: torch.Tensor
    """(B, T, V)"""


class SwarmModel:
    """Client for one model served by a swarm. Build with :meth:`from_pretrained`; close with :meth:`close`."""

    def __init__(self, sequence: RemoteSequence, local: SpanModel | None, loop: BackgroundLoop, dht: DHT,
                 path: Path, *, remote_stages: bool):
        self.sequence, self.local, self.loop, self.dht = sequence, local, loop, dht
        self.path = path
        self.config = load_config(path)
        self.num_layers = self.config.num_hidden_layers
        self.remote_stages = remote_stages
        self.active_session: InferenceSession | None = None
        """The inference session of the generation in progress (its ``route`` shows the nodes in use)."""
        self.closed = False
        # A script that never calls close() still ends quietly: its p2p connection is shut down at exit (while the
        # loop's daemon thread still runs), not torn down mid-task by the interpreter ("Task was destroyed ...").
        self._close_at_exit = functools.partial(_close_if_alive, weakref.ref(self))
        atexit.register(self._close_at_exit)

    @classmethod
    def from_pretrained(cls, model: str = "smollm2-135m", initial_peers: Sequence[str] = (), *,
                        cache_dir: Path | None = None, remote_stages: bool = False,
                        client_config: ClientConfig = ClientConfig(), dtype: torch.dtype = torch.float32) -> "SwarmModel":
        """Connect to the swarm serving ``model`` (an alias or a local checkpoint directory).

        The checkpoint must be available locally too: its hash names the model in the DHT, and the client
        loads the embedding and head from it (only those tensors) unless ``remote_stages``.
        """
        if not initial_peers:
            raise ValueError("initial_peers is empty: pass the multiaddrs a node printed ('--initial-peers ...').")
        path = resolve_checkpoint(model, cache_dir)
        config = load_config(path)
        digest = checkpoint_hash(path)
        name = model if not Path(model).exists() else Path(model).resolve().name
        loop = BackgroundLoop()
        dht, owner = swarm_dht(initial_peers, checkpoint_hashes=(digest,), client_mode=True)
        p2p = loop.run(dht.replicate_p2p())
        sequence = RemoteSequence(dht, p2p, loop, key=model_key(digest), model_name=name,
                                  num_layers=config.num_hidden_layers, checkpoint_hash=digest, config=client_config,
                                  hidden_size=config.hidden_size, owner=owner)
        local = None if remote_stages else SpanModel.load(path, Span(0, 0, embed=True, head=True), dtype=dtype)
        return cls(sequence, local, loop, dht, path, remote_stages=remote_stages)

    @cached_property
    def tokenizer(self) -> Any:
        """The checkpoint's own tokenizer (from :attr:`path`; left padding), or None where the checkpoint has no
        tokenizer files."""
        return load_tokenizer(self.path)

    @cached_property
    def stop_tokens(self) -> StopTokens:
        """What :meth:`generate` stops at by default (see :mod:`swarm.tokens`)."""
        return checkpoint_stop_tokens(self.path, self.config, self.tokenizer)

    def close(self) -> None:
        """Leave the swarm: shut the p2p connection and the DHT down (idempotent; also done at exit)."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self._close_at_exit)
        try:
            self.loop.run(self.sequence.p2p.shutdown(), timeout_s=5)
        except Exception as e:  # closing is best effort; the daemon dies with the DHT anyway
            logger.debug("P2P shutdown failed: %s", e)
        self.dht.shutdown()
        self.loop.close()

    def __enter__(self) -> "SwarmModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def route(self) -> RouteTable:
        """The route a forward would take now: a list of hops (peer id, layers) that prints as a table with each
        node's address and the latency this client measured to it."""
        hops = self.loop.run(self.sequence.route(embed=self.remote_stages, head=self.remote_stages, refresh=True))
        return RouteTable(hops, addresses=self.loop.run(self._addresses()), latency_s=dict(self.sequence._latency_s),
                          embed=self.remote_stages, head=self.remote_stages)

    async def _addresses(self) -> dict[str, str]:
        """Peer id → the first multiaddr this client's p2p daemon knows for it (best effort: display only)."""
        try:
            peers = await self.sequence.p2p.list_peers()
        except Exception as e:  # a display detail: the route is still right without addresses
            logger.debug("listing peers failed: %s", e)
            return {}
        return {str(p.peer_id): str(p.addrs[0]) for p in peers if p.addrs}

    # ---- forward ----------------------------------------------------------------------------------------

    def __call__(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
        return CausalLMOutput(self.forward(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask))

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, T, V)``; differentiable w.r.t. ``inputs_embeds`` when it requires grad."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids or inputs_embeds.")
        if self.remote_stages:
            if inputs_embeds is not None:
                raise ValueError("inputs_embeds needs the local embedding; build the model with remote_stages=False.")
            logits, _ = self.loop.run(self.sequence.forward(input_ids, attention_mask=attention_mask,
                                                            embed=True, head=True))
            return logits
        hidden = self.local(input_ids, start=0, end=0, embed=True) if inputs_embeds is None else inputs_embeds
        if torch.is_grad_enabled() and hidden.requires_grad:
            hidden = _RemoteBody.apply(hidden, self, attention_mask)
        else:
            hidden, _ = self.loop.run(self.sequence.forward(hidden.detach(), attention_mask=attention_mask))
        return self.local(hidden, start=0, end=0, head=True)

    # ---- generation -------------------------------------------------------------------------------------

    def inference_session(self, batch_size: int, max_length: int) -> InferenceSession:
        return self.loop.run(InferenceSession.create(self.sequence, batch_size=batch_size, max_length=max_length,
                                                     embed=self.remote_stages, head=self.remote_stages))

    def _step(self, session: InferenceSession, ids: torch.Tensor, mask: torch.Tensor | None,
              positions: torch.Tensor) -> torch.Tensor:
        if self.remote_stages:
            return self.loop.run(session.step(ids, attention_mask=mask, position_ids=positions))
        hidden = self.local(ids, start=0, end=0, embed=True)
        hidden = self.loop.run(session.step(hidden, attention_mask=mask, position_ids=positions))
        return self.local(hidden, start=0, end=0, head=True)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int = 20, *, attention_mask: torch.Tensor | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None,
                 eos_token_id: int | Sequence[int] | None | Literal["checkpoint"] = "checkpoint",
                 pad_token_id: int | None = None,
                 on_token: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
        """Greedy or sampled continuation through server-side KV caches; returns prompt + new tokens ``(B, T+N)``.

        Positions follow transformers: with a left-padded ``attention_mask``, ``position = cumsum(mask) - 1``.
        A row stops at ``eos_token_id`` (an id or a list of ids; by default the checkpoint's EOS and end-of-turn
        tokens, :attr:`stop_tokens`; None never stops early) and then emits ``pad_token_id`` (default: the
        checkpoint's pad token, else the first EOS) until every row has stopped, as transformers' ``generate``.
        ``on_token(step, tokens)`` is called with each new column of tokens ``(B,)`` as it is produced (for
        streaming output).
        """
        if isinstance(eos_token_id, str) and eos_token_id != "checkpoint":
            raise ValueError(f"eos_token_id must be an id, a list of ids, None or 'checkpoint'; got {eos_token_id!r}")
        eos = self.stop_tokens.eos if isinstance(eos_token_id, str) else eos_token_id
        if pad_token_id is None and eos:
            pad_token_id = self.stop_tokens.pad
        stop = StopTokens.of(eos, pad_token_id)
        stops = torch.tensor(stop.eos, dtype=torch.long)
        batch, length = input_ids.shape
        mask = attention_mask.to(torch.int64) if attention_mask is not None else None
        if mask is not None:
            positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        else:
            positions = torch.arange(length).unsqueeze(0).expand(batch, -1)
        session = self.active_session = self.inference_session(batch, length + max_new_tokens)
        out, done = input_ids, torch.zeros(batch, dtype=torch.bool)
        try:
            logits = self._step(session, input_ids, mask, positions)
            for _ in range(max_new_tokens):
                token = pick_token(logits[:, -1].float(), do_sample, temperature, top_k, top_p, generator)  # (B,)
                if stop.eos:
                    token = torch.where(done, torch.full_like(token, stop.pad), token)
                    done |= torch.isin(token, stops)
                out = torch.cat([out, token[:, None]], dim=1)
                if on_token is not None:
                    on_token(out.shape[1] - length - 1, token)
                if done.all() or out.shape[1] == length + max_new_tokens:
                    break
                positions = positions[:, -1:] + 1
                if mask is not None:
                    mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
                logits = self._step(session, token[:, None], mask, positions)
        finally:
            self.active_session = None
            self.loop.run(session.close())
        return out


def _close_if_alive(ref: "weakref.ref[SwarmModel]") -> None:
    model = ref()
    if model is not None:
        model.close()


def pick_token(logits: torch.Tensor, do_sample: bool, temperature: float, top_k: int | None, top_p: float | None,
               generator: torch.Generator | None) -> torch.Tensor:
    """The next token ``(B,)`` from last-position logits ``(B, V)``: argmax, or a sample after temperature, top-k and
    top-p (nucleus) filtering."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits / max(temperature, 1e-5)
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = torch.sort(logits, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) > top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class _RemoteBody(torch.autograd.Function):
    """Hidden states through the swarm with gradients: forward keeps each hop's input, backward asks each hop."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, model: SwarmModel, attention_mask: torch.Tensor | None):
        out, trail = model.loop.run(model.sequence.forward(hidden.detach(), attention_mask=attention_mask,
                                                           keep_hop_inputs=True))
        ctx.model, ctx.trail, ctx.mask = model, trail, attention_mask
        return out

    @staticmethod
    def backward(ctx, grad_outputs: torch.Tensor):
        grad = ctx.model.loop.run(ctx.model.sequence.backward(ctx.trail, grad_outputs.contiguous(),
                                                              attention_mask=ctx.mask))
        return grad, None, None
