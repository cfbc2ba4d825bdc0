"""Generation with per-step interventions: one traced graph, run step by step in any placement.

Step ``s`` is forward call ``s`` (the prompt in step 0, one new token after). Each step plans only its own nodes
(:func:`hybrid.planner.plan_graph` with ``step=s``): values of earlier steps that it reads come from the client (who
got them back at the end of their step), values later steps read go back to the client with the step's saves.

- ``local``: the whole model here with a KV cache; the graph runs on module hooks.
- ``hybrid`` / ``centralized``: a server-side KV cache on every hop, the hops chained node → node
  (:class:`swarm.chained_session.ChainedSession`): the client sends each step (token ids, or its embedding's output)
  with the step's graph to the first hop; each hop passes the hidden states and the values later executors need to
  the next; the last hop's answer (the last position, and the values the client needs) comes back. With
  ``ClientConfig.verify``, steps are spot-checked by replaying the session on another route
  (:func:`swarm.verification.check_chained_step`), hook results compared by :func:`hybrid.values.results_agree`.
- ``swarm`` (Petals-style): one session per range of layers between intervened boundaries; the client runs the
  graph on the hidden states it pulls at each boundary.

Tokens are picked as transformers' ``generate`` does: greedy by default, or sampled (temperature, top-k, top-p);
a row that produced an EOS (the checkpoint's EOS and end-of-turn tokens by default, :mod:`swarm.tokens`) then emits
the pad token, and generation stops when every row has.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers import DynamicCache

from swarm.chained_session import ChainedSession
from swarm.inference_session import InferenceSession
from swarm.remote_sequence import HookRequest
from swarm.model import pick_token
from swarm.tokens import StopTokens

from .errors import HybridError
from .interpreter import Interpreter
from .ir import Graph
from .planner import Executor, Plan, module_stage, plan_graph
from .placements import (ClientLinkMeter, SwarmRunner, TraceStats, check_one_hop, layer_boundaries, pull_through,
                         run_local_stage, segments)
from .request import HOOK_KIND, HOOK_VERSION, NO_LINKS, SessionLinks, encode_request
from .values import pack_values, results_agree, unpack_values

# step(s, ids (B, T_s), mask (B, past + T_s) | None, positions (B, T_s), known values) -> (out, new values), where out
# is the logits (B, T_s or 1, V), or the greedy next token (B, 1) when the node that ran the head picked it
Stepper = Callable[[int, torch.Tensor, "torch.Tensor | None", torch.Tensor, dict], "tuple[torch.Tensor, dict]"]


@dataclass(frozen=True)
class GenerateOptions:
    """How tokens are chosen (the ``transformers.generate`` arguments ``lm.generate`` accepts)."""

    max_new_tokens: int = 20
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    """Seed of the sampling generator (sampling only)."""
    eos_token_id: int | tuple[int, ...] | None = None
    """Rows stop at this token or any of these tokens (then emit ``pad_token_id``); None never stops early."""
    pad_token_id: int | None = None
    """What a stopped row emits (None: the first EOS, as transformers)."""

    def __post_init__(self) -> None:
        eos = self.eos_token_id
        if isinstance(eos, (list, tuple)):
            if len(eos) > 64 or not all(type(i) is int for i in eos):
                raise ValueError(f"eos_token_id must be an id or a list of at most 64 ids; got {eos!r:.200}")
            object.__setattr__(self, "eos_token_id", tuple(eos))
        elif eos is not None and type(eos) is not int:
            raise ValueError(f"eos_token_id must be an id or a list of ids; got {eos!r:.200}")
        if self.pad_token_id is not None and type(self.pad_token_id) is not int:
            raise ValueError(f"pad_token_id must be an id; got {self.pad_token_id!r:.200}")

    @property
    def stop(self) -> StopTokens:
        return StopTokens.of(self.eos_token_id, self.pad_token_id)

    @classmethod
    def from_kwargs(cls, kwargs: dict, *, eos_token_id: int | tuple[int, ...] | None,
                    pad_token_id: int | None) -> "GenerateOptions":
        """Options from ``lm.generate(..., **kwargs)``. Raises HybridError naming an unsupported argument."""
        known = {"max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed", "eos_token_id",
                 "pad_token_id"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise HybridError(f"lm.generate does not support {unknown}; it takes {sorted(known)}")
        try:
            options = cls(**{"eos_token_id": eos_token_id, "pad_token_id": pad_token_id, **kwargs})
        except ValueError as e:
            raise HybridError(str(e)) from None
        if not isinstance(options.max_new_tokens, int) or options.max_new_tokens < 1:
            raise HybridError(f"max_new_tokens must be a positive integer; got {options.max_new_tokens!r}")
        return options


def generate(stepper: Stepper, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
             options: GenerateOptions, links: SessionLinks = NO_LINKS) -> tuple[torch.Tensor, dict[int, Any]]:
    """Run ``stepper`` for up to ``max_new_tokens`` steps; returns ``(tokens (B, T + N), values of every step)``.
    Values an earlier trace of the session left with the client (``links.supplied``) are known from the start."""
    batch, length = input_ids.shape
    mask = attention_mask.long() if attention_mask is not None else None
    if mask is not None:
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as transformers' generate
    else:
        positions = torch.arange(length).unsqueeze(0).expand(batch, -1)
    generator = torch.Generator().manual_seed(options.seed) if options.seed is not None else None
    known: dict[int, Any] = dict(links.supplied)
    tokens, current = input_ids, input_ids
    done = torch.zeros(batch, dtype=torch.bool)
    stop = options.stop
    stops = torch.tensor(stop.eos, dtype=torch.long)
    for step in range(options.max_new_tokens):
        out, values = stepper(step, current, mask, positions, known)
        known.update(values)
        if out.is_floating_point():  # logits
            token = pick_token(out[:, -1].float(), options.do_sample, options.temperature, options.top_k,
                               options.top_p, generator)  # (B,)
        else:  # the node picked the greedy token (B, 1): the logits never came back
            token = out[:, -1]
        if stop.eos:
            token = torch.where(done, torch.full_like(token, stop.pad), token)
            done |= torch.isin(token, stops)
        tokens = torch.cat([tokens, token[:, None]], dim=1)
        if bool(done.all()):
            break
        positions = positions[:, -1:] + 1
        if mask is not None:
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
        current = token[:, None]
    return tokens, known


def local_stepper(model, graph: Graph, events, links: SessionLinks = NO_LINKS) -> tuple[Stepper, TraceStats]:
    """Steps on the whole model in this process."""
    n = model.config.num_hidden_layers
    cache = DynamicCache()
    device = next(model.parameters()).device
    modules = dict(model.named_modules())
    stats = TraceStats("local", route=["local"])

    def step(s, ids, mask, positions, known):
        plan = plan_graph(graph, events, n, [Executor("local", 0, n + 1)], step=s)
        interpreter = Interpreter(graph, plan, 0, {k: known[k] for k in plan.inputs}, device=device, modules=modules)
        logits = run_local_stage(model, interpreter, ids, s, embed=True, head=True, attention_mask=mask,
                                 position_ids=positions, cache=cache, logits_to_keep=1)
        return logits, interpreter.finish()
    return step, stats


class SwarmSteps:
    """Steps through a swarm, pushed (``hybrid`` / ``centralized``) or pulled (``swarm``); a context manager that
    closes its sessions. :attr:`stats` is filled in as it runs."""

    def __init__(self, runner: SwarmRunner, placement: str, graph: Graph, events, *, batch_size: int, max_length: int,
                 links: SessionLinks = NO_LINKS, greedy: bool = False):
        self.runner, self.placement, self.graph, self.events, self.links = runner, placement, graph, events, links
        self.greedy = greedy
        self.loop, self.sequence, self.n = runner.client.loop, runner.sequence, runner.num_layers
        self.stats = TraceStats(placement)
        self._meter = ClientLinkMeter(self.sequence)
        self.sessions: list[InferenceSession | ChainedSession] = []
        self.head_nodes = _touches_head(graph, self.n)
        if placement == "swarm":
            self.boundaries = layer_boundaries(graph)
            self.remote_embed = self.remote_head = False
            ranges = segments(self.boundaries, self.n)
        else:
            self.remote_embed, self.remote_head = runner.remote_stages()
            # The head runs on a node only where the graph needs it there; otherwise the client's head turns the
            # last position's hidden state into the next token, and the logits never cross the link.
            self.remote_head = self.remote_head and self.head_nodes
            ranges = [(0, self.n)]
        kind = InferenceSession if placement == "swarm" else ChainedSession
        for start, end in ranges:
            self.sessions.append(self.loop.run(kind.create(
                self.sequence, batch_size=batch_size, max_length=max_length, start=start, end=end,
                embed=self.remote_embed, head=self.remote_head)))
        self._segment = {start: i for i, (start, _) in enumerate(ranges)}
        if placement == "centralized":
            try:
                check_one_hop(self.sessions[0].route, self.n)
            except HybridError:
                self.close()
                raise

    def __enter__(self) -> "SwarmSteps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for session in self.sessions:
            self.loop.run(session.close())
        self._meter.charge(self.stats)
        for session in self.sessions:
            for peer, seconds in session.compute_s.items():
                self.stats.compute_s[peer] = self.stats.compute_s.get(peer, 0.0) + seconds
            self.stats.node_bytes += getattr(session, "node_bytes", 0)
        self.sessions = []

    def __call__(self, s, ids, mask, positions, known):
        if self.placement == "swarm":
            return self._pulled(s, ids, mask, positions, known)
        return self._pushed(s, ids, mask, positions, known)

    def _plan(self, s: int, route) -> Plan:
        return plan_graph(self.graph, self.events, self.n,
                          self.runner.executors(route, self.remote_embed, self.remote_head), step=s,
                          held=self.links.held)

    def _pushed(self, s, ids, mask, positions, known):
        session, local, modules = self.sessions[0], self.runner.local, self.runner.modules
        plan = self._plan(s, session.route)
        carried = {k: known[k] for k in plan.inputs}
        if self.remote_embed:
            inputs, values = ids, carried
        else:  # the client's embedding is executor 0
            interpreter = Interpreter(self.graph, plan, 0, carried, modules=modules)
            inputs = run_local_stage(local, interpreter, ids, s, start=0, end=0, embed=True)
            values = interpreter.finish()
        offset = 0 if self.remote_embed else 1
        plans = {_route_key(session.route): plan}

        def payload(route) -> bytes:  # planned again only if the route changed (failover)
            key = _route_key(route)
            if key not in plans:
                plans[key] = self._plan(s, route)
            return encode_request(self.graph, plans[key], offset, call=s, keep=self.links.keep)

        # The client needs the last position only, unless its own head has graph nodes that read every position;
        # with the head on the last node and greedy decoding, only the next token: the logits stay there.
        last_only = self.remote_head or not self.head_nodes
        # Spot checks replay the session elsewhere and compare the hook results within their dtype's tolerance; a
        # graph loading values an earlier trace left on this route's nodes cannot be replayed elsewhere (skipped).
        outputs, result = self.loop.run(session.step(
            inputs, attention_mask=mask, position_ids=positions,
            hook=HookRequest(HOOK_KIND, HOOK_VERSION, payload, results_agree), carry=pack_values(values),
            last_only=last_only, argmax=self.remote_head and self.greedy, checkable=not self.links.held))
        values = unpack_values(result)
        plan = plans[_route_key(session.route)]
        self.stats.route = [e.name for e in plan.executors]
        if self.remote_head:
            return outputs, values
        interpreter = Interpreter(self.graph, plan, len(plan.executors) - 1, values, modules=modules)
        logits = run_local_stage(local, interpreter, outputs, s, start=0, end=0, head=True, logits_to_keep=1)
        return logits, interpreter.finish()

    def _pulled(self, s, ids, mask, positions, known):
        local, modules = self.runner.local, self.runner.modules
        plan = plan_graph(self.graph, self.events, self.n, [Executor("client", 0, self.n + 1)], step=s)
        interpreter = Interpreter(self.graph, plan, 0, {k: known[k] for k in plan.inputs}, modules=modules)
        hidden = run_local_stage(local, interpreter, ids, s, start=0, end=0, embed=True)
        def run_segment(start: int, end: int, hidden: torch.Tensor) -> torch.Tensor:
            return self.loop.run(self.sessions[self._segment[start]].step(hidden, attention_mask=mask, position_ids=positions))
        hidden = pull_through(interpreter, hidden, s, self.boundaries, self.n, run_segment)
        self.stats.route = ["client"]
        logits = run_local_stage(local, interpreter, hidden, s, start=0, end=0, head=True, logits_to_keep=1)
        return logits, interpreter.finish()


def _route_key(route) -> tuple:
    return tuple((h.peer_id, h.start, h.end) for h in route)


def _touches_head(graph: Graph, num_layers: int) -> bool:
    """Whether the graph reads, writes or calls the final norm or the LM head."""
    return any(node.op in ("getter", "setter", "module") and module_stage(node.module, num_layers) == num_layers + 1
               for node in graph.nodes)
