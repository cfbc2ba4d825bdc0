"""Bad input to a real node is answered with the right typed error, whose message names the offending value or
the limit, and the node keeps serving: after every case a normal forward still equals local transformers.

One module-scoped set of processes keeps this file fast: a 6-layer tiny llama split over two nodes (0:3 with the
embedding, 3:6 with the head), plus a node in a swarm of its own that serves 0:6 with a 100 kB request limit.
Well-formed frames go through :func:`swarm.transport.call`; malformed ones are hand-built protobuf messages sent
with ``iterate_protobuf_handler``.
"""

from __future__ import annotations

import asyncio
import random
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import msgpack
import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.proto import runtime_pb2

from swarm import SwarmModel
from swarm.errors import (BadRequestError, HookError, PayloadTooLargeError, PeerUnreachableError,
                          SequenceTooLongError, SwarmError, UnknownSessionError)
from swarm.local_swarm import LocalSwarm, NodeProcess
from swarm.span_server import BACKWARD, FORWARD, INFERENCE, TENSOR_NAMES
from swarm.transport import call
from swarm.wire import ALLOWED_DTYPES, WIRE_VERSION, encode_frame, read_frame
from tests.integration.conftest import local_model, start_split

SPLIT = [(0, 3), (3, 6)]
LIMITED_REQUEST_BYTES = 100_000
NODE_MAX_LENGTH = 256  # min(ServerLimits.max_length, the tiny config's max_position_embeddings)
VOCAB, HIDDEN = 128, 64
TIMEOUT_S = 15.0
MiB = 1 << 20


@dataclass
class Env:
    path: Path
    main: LocalSwarm
    limited_swarm: LocalSwarm
    client: SwarmModel
    limited_client: SwarmModel
    ref: torch.nn.Module
    ids: torch.Tensor
    """(2, 24) token ids of the health check."""
    want: torch.Tensor
    """(2, 24, V) local logits of ``ids``."""

    @property
    def first(self) -> NodeProcess:
        return self.main.nodes[0]

    @property
    def second(self) -> NodeProcess:
        return self.main.nodes[1]

    @property
    def limited(self) -> NodeProcess:
        return self.limited_swarm.nodes[0]


@pytest.fixture(scope="module")
def env(tiny_checkpoint_factory, tmp_path_factory):
    path = tiny_checkpoint_factory("llama", num_layers=6)
    root = tmp_path_factory.mktemp("bad_input")
    main, limited = LocalSwarm(root / "main"), LocalSwarm(root / "limited")
    main.workdir.mkdir()
    limited.workdir.mkdir()
    clients: list[SwarmModel] = []
    try:
        with ThreadPoolExecutor(1) as pool:  # the limited node starts while the split does
            limited_ready = pool.submit(limited.start, path, "--blocks", "0:6",
                                        "--max-request-bytes", str(LIMITED_REQUEST_BYTES))
            start_split(main, path, SPLIT)
            limited_ready.result()
        clients.append(SwarmModel.from_pretrained(str(path), initial_peers=main.initial_peers))
        clients.append(SwarmModel.from_pretrained(str(path), initial_peers=limited.initial_peers))
        client, limited_client = clients
        assert [(h.start, h.end) for h in client.route()] == SPLIT  # also connects to (and pings) both nodes
        assert [(h.start, h.end) for h in limited_client.route()] == [(0, 6)]
        ref = local_model(path)
        ids = torch.randint(3, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = ref(ids).logits
        yield Env(path, main, limited, client, limited_client, ref, ids, want)
    finally:
        for client in clients:
            client.close()
        main.close()
        limited.close()


# ---- helpers ------------------------------------------------------------------------------------------------

def assert_serves(env: Env) -> None:
    """Every node process is alive, and normal forwards through both swarms equal local transformers."""
    for node in env.main.nodes + env.limited_swarm.nodes:
        assert node.proc.poll() is None, f"node died:\n{node.log()[-3000:]}"
    for client in (env.client, env.limited_client):
        got = client(env.ids).logits
        assert (got - env.want).abs().max().item() <= 1e-5


def rpc(env: Env, node: NodeProcess, handle: str, tensors: dict[str, torch.Tensor], meta: dict, *,
        client: SwarmModel | None = None, timeout_s: float = TIMEOUT_S):
    """A well-formed frame through the real transport; returns ``(named outputs, reply meta)``."""
    client = client or env.client
    return client.loop.run(call(client.sequence.p2p, node.peer_id, handle, tensors, meta, timeout_s=timeout_s))


async def _aiter(items):
    for item in items:
        yield item


def raw(env: Env, node: NodeProcess, messages: list, handle: str = FORWARD, *, timeout_s: float = TIMEOUT_S):
    """Send hand-built request messages; return the response frame ``(tensors, meta)`` or raise its error."""
    p2p = env.client.sequence.p2p

    async def exchange():
        stream = await p2p.iterate_protobuf_handler(PeerID.from_base58(node.peer_id), handle, _aiter(messages),
                                                    runtime_pb2.ExpertResponse)
        try:
            return await read_frame(stream)
        finally:
            await stream.aclose()

    try:
        return env.client.loop.run(asyncio.wait_for(exchange(), timeout_s))
    except asyncio.TimeoutError:
        raise PeerUnreachableError(f"no answer within {timeout_s} s") from None


def frame(tensors: list[torch.Tensor], meta: dict) -> list[runtime_pb2.ExpertRequest]:
    """A request frame whose ``meta`` (``names`` included) is sent exactly as given."""
    return list(encode_frame(tensors, meta))


def header(meta: dict | None = None, parts: list | None = None, v: int = WIRE_VERSION) -> runtime_pb2.ExpertRequest:
    return runtime_pb2.ExpertRequest(metadata=msgpack.packb({"v": v, "meta": meta or {}, "parts": parts or []}))


@contextmanager
def rejected(cls: type[SwarmError], *fragments: str):
    """The block raises exactly ``cls`` (not a parent or sibling) whose message contains every fragment."""
    with pytest.raises(SwarmError) as info:
        yield info
    err = info.value
    assert type(err) is cls, f"expected {cls.__name__}, got {type(err).__name__}: {err}"
    for fragment in fragments:
        assert fragment in err.message, f"{fragment!r} not in {err.message!r}"


def hidden(batch: int = 2, length: int = 5, dim: int = HIDDEN, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(batch, length, dim).to(dtype)


def local_hidden(env: Env, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Local hidden states after ``layer`` decoder layers."""
    with torch.no_grad():
        return env.ref(ids, output_hidden_states=True).hidden_states[layer]


# ---- malformed frames and RPC payloads ----------------------------------------------------------------------

def test_malformed_frames(env):
    with rejected(BadRequestError, "Malformed frame header"):
        raw(env, env.first, [runtime_pb2.ExpertRequest(metadata=b"\x93garbage\xff\x00")])
    with rejected(BadRequestError, "Malformed frame header", "'parts'"):
        raw(env, env.first, [runtime_pb2.ExpertRequest(metadata=msgpack.packb({"v": 1, "meta": {}, "parts": "x"}))])
    with rejected(BadRequestError, "Wire version 7", f"speaks {WIRE_VERSION}"):
        raw(env, env.first, [header(v=7)])
    with rejected(BadRequestError, "Empty request stream"):
        raw(env, env.first, [])
    with rejected(BadRequestError, "65 tensors", "at most 64"):
        raw(env, env.first, [header({"names": []}, [1] * 65)])

    messages = frame([hidden()], {"names": ["inputs"], "start": 0, "end": 3})
    with rejected(BadRequestError, "ended early", "fewer tensor chunks than its header announced"):
        raw(env, env.first, [header({"names": ["inputs"]}, [3])] + messages[1:])  # announces 3 chunks, sends 1
    short = [runtime_pb2.ExpertRequest() for _ in messages]
    for a, b in zip(short, messages):
        a.CopyFrom(b)
    short[1].tensors[0].buffer = short[1].tensors[0].buffer[:-4]
    with rejected(BadRequestError, "needs 2560 bytes but 2556 arrived", "[2, 5, 64]"):
        raw(env, env.first, short)
    messages[1].tensors[0].dtype = "complex64"
    with rejected(BadRequestError, "'complex64'", "float32"):
        raw(env, env.first, messages)
    two = runtime_pb2.ExpertRequest(tensors=[messages[1].tensors[0], messages[1].tensors[0]])
    with rejected(BadRequestError, "exactly one tensor part"):
        raw(env, env.first, [messages[0], two])
    announced = frame([hidden()], {"names": ["inputs"]})
    announced[1].tensors[0].chunks = 2
    with rejected(BadRequestError, "announced 2 chunks but 1 arrived"):
        raw(env, env.first, announced)
    # a request that claims to be an error frame is a bad request, not an error to reflect back
    for error in ({"code": "capacity", "message": "cache full"}, "not even a dict"):
        with rejected(BadRequestError, "must not carry meta['error']"):
            raw(env, env.first, [header({"error": error})])
    assert_serves(env)


def test_names_must_match_tensors(env):
    x = hidden()
    base = {"start": 0, "end": 3}
    with rejected(BadRequestError, "one name per tensor", "['inputs']"):
        raw(env, env.first, frame([x, torch.ones(2, 5, dtype=torch.int64)], {**base, "names": ["inputs"]}))
    with rejected(BadRequestError, "one name per tensor", "'inputs'"):
        raw(env, env.first, frame([x], {**base, "names": "inputs"}))
    with rejected(BadRequestError, "'surprise'", "'attention_mask'"):  # unknown name; the allowed ones are listed
        raw(env, env.first, frame([x, x], {**base, "names": ["inputs", "surprise"]}))
    with rejected(BadRequestError, "[['inputs']]"):
        raw(env, env.first, frame([x], {**base, "names": [["inputs"]]}))
    with rejected(BadRequestError, "Duplicate tensor names", "['inputs', 'inputs']"):
        raw(env, env.first, frame([x, x], {**base, "names": ["inputs", "inputs"]}))
    with rejected(BadRequestError, "no 'inputs' tensor"):
        rpc(env, env.first, FORWARD, {"attention_mask": torch.ones(2, 5, dtype=torch.int64)}, base)
    with rejected(BadRequestError, "start/end must be integers", "0.5"):
        rpc(env, env.first, FORWARD, {"inputs": x}, {"start": 0.5, "end": 3})
    assert_serves(env)


def test_wrong_dtype_and_shape(env):
    meta = {"start": 0, "end": 3}
    with rejected(BadRequestError, "'float64'", "float32"):  # refused at the wire: not an accepted dtype
        rpc(env, env.first, FORWARD, {"inputs": hidden(dtype=torch.float64)}, meta)
    with rejected(BadRequestError, "Hidden states must be torch.float32", "got torch.int64"):
        rpc(env, env.first, FORWARD, {"inputs": hidden(dtype=torch.int64)}, meta)
    with rejected(BadRequestError, "Hidden states must be torch.float32", "got torch.float16"):
        rpc(env, env.second, FORWARD, {"inputs": hidden(dtype=torch.float16)}, {"start": 3, "end": 6})
    with rejected(BadRequestError, "Token ids must be a 2D int64", "torch.float32 (2, 5)"):
        rpc(env, env.first, FORWARD, {"inputs": torch.rand(2, 5) * 100}, {**meta, "embed": True})
    with rejected(BadRequestError, "Token ids must be a 2D int64", "(2, 5, 1)"):
        rpc(env, env.first, FORWARD, {"inputs": torch.ones(2, 5, 1, dtype=torch.int64)}, {**meta, "embed": True})
    with rejected(BadRequestError, f"(B, T, {HIDDEN})", "got (2, 5)"):
        rpc(env, env.first, FORWARD, {"inputs": torch.randn(2, 5)}, meta)
    with rejected(BadRequestError, f"(B, T, {HIDDEN})", "got (2, 5, 32)"):
        rpc(env, env.first, FORWARD, {"inputs": hidden(dim=32)}, meta)
    with rejected(BadRequestError, "Empty input", "(0, 5, 64)"):
        rpc(env, env.first, FORWARD, {"inputs": hidden(batch=0)}, meta)
    with rejected(BadRequestError, "attention_mask", "past+T=5", "(2, 9)"):  # longer than the sequence
        rpc(env, env.first, FORWARD, {"inputs": hidden(), "attention_mask": torch.ones(2, 9, dtype=torch.int64)}, meta)
    with rejected(BadRequestError, "attention_mask", "torch.float32"):
        rpc(env, env.first, FORWARD, {"inputs": hidden(), "attention_mask": torch.ones(2, 5)}, meta)
    with rejected(BadRequestError, "position_ids must be int64", "torch.int64 (3, 5)"):
        rpc(env, env.first, FORWARD, {"inputs": hidden(), "position_ids": torch.zeros(3, 5, dtype=torch.int64)}, meta)
    assert_serves(env)


def test_token_ids_out_of_range(env):
    ids = torch.randint(3, VOCAB, (2, 5))
    for bad, shown in ((VOCAB, f"[3, {VOCAB}]"), (-1, "[-1, ")):
        ids_bad = ids.clone()
        ids_bad[1, 2] = bad
        ids_bad[0, 0] = 3
        with rejected(BadRequestError, f"Token ids must be in [0, {VOCAB})", shown):
            rpc(env, env.first, FORWARD, {"inputs": ids_bad}, {"start": 0, "end": 3, "embed": True})
    assert_serves(env)


def test_layers_and_stages_outside_the_span(env):
    x = hidden()
    with rejected(BadRequestError, "Layers 0:6", "span 0:3"):
        rpc(env, env.first, FORWARD, {"inputs": x}, {"start": 0, "end": 6})
    with rejected(BadRequestError, "Layers 2:5", "span 3:6"):
        rpc(env, env.second, FORWARD, {"inputs": x}, {"start": 2, "end": 5})
    with rejected(BadRequestError, "Layers 1:1", "span 0:3"):  # empty range without a stage
        rpc(env, env.first, FORWARD, {"inputs": x}, {"start": 1, "end": 1})
    with rejected(BadRequestError, "does not serve the embedding", "start == 0"):
        rpc(env, env.second, FORWARD, {"inputs": torch.randint(0, VOCAB, (2, 5))}, {"start": 3, "end": 6, "embed": True})
    with rejected(BadRequestError, "does not serve the embedding", "start == 0"):
        rpc(env, env.first, FORWARD, {"inputs": torch.randint(0, VOCAB, (2, 5))}, {"start": 1, "end": 3, "embed": True})
    with rejected(BadRequestError, "does not serve the head", "end == num_layers"):
        rpc(env, env.first, FORWARD, {"inputs": x}, {"start": 0, "end": 3, "head": True})
    with rejected(BadRequestError, "does not serve the head", "end == num_layers"):
        rpc(env, env.second, FORWARD, {"inputs": x}, {"start": 3, "end": 5, "head": True})
    # the stages a node does serve work, and equal local transformers
    ids = env.ids[:, :7]
    out, _ = rpc(env, env.first, FORWARD, {"inputs": ids}, {"start": 0, "end": 3, "embed": True})
    assert (out["outputs"] - local_hidden(env, ids, 3)).abs().max().item() <= 1e-5
    assert_serves(env)


# ---- inference sessions -------------------------------------------------------------------------------------

def test_inference_session_errors(env):
    node, ids = env.first, env.ids[:, :8]
    layers = {"start": 0, "end": 3, "embed": True}

    def step(session_id: str, inputs: torch.Tensor, **meta):
        out, reply = rpc(env, node, INFERENCE, {"inputs": inputs, **meta.pop("tensors", {})},
                         {**layers, "session_id": session_id, **meta})
        return out.get("outputs"), reply

    with rejected(UnknownSessionError, "'never-opened'", "meta['open']"):
        step("never-opened", ids[:, :5])
    with rejected(BadRequestError, "session_id"):
        step("", ids[:, :5])
    with rejected(BadRequestError, "meta['open']['max_length']", "positive integer"):
        step("bad-open", ids[:, :5], open={"max_length": "8"})
    with rejected(SequenceTooLongError, "max_length=1000", f"limit of {NODE_MAX_LENGTH}"):
        step("too-long", ids[:, :5], open={"max_length": 1000, "batch_size": 2})
    with rejected(SequenceTooLongError, f"length {NODE_MAX_LENGTH + 44}", f"limit of {NODE_MAX_LENGTH}"):
        rpc(env, node, FORWARD, {"inputs": torch.randint(0, VOCAB, (1, NODE_MAX_LENGTH + 44))}, layers)
    with rejected(SequenceTooLongError, f"[0, {NODE_MAX_LENGTH})", "got max 300"):
        step("far", ids[:, :5], open={"max_length": 8}, tensors={"position_ids": torch.arange(296, 301)[None]})
    with rejected(BadRequestError, f"[0, {NODE_MAX_LENGTH})", "got min -3"):
        step("negative", ids[:, :5], open={"max_length": 8}, tensors={"position_ids": torch.arange(-3, 2)[None]})

    with rejected(BadRequestError, "meta['argmax']", "'head': true", "'last_only': true"):  # this node has no head
        step("argmax", ids[:, :5], open={"max_length": 8, "batch_size": 2}, last_only=True, argmax=True)
    with rejected(BadRequestError, "meta['last_only'] and meta['argmax'] must be booleans"):
        step("argmax", ids[:, :5], open={"max_length": 8, "batch_size": 2}, argmax="yes")
    first, reply = step("s", ids[:, :5], open={"max_length": 8, "batch_size": 2})
    assert reply["length"] == 5
    with rejected(BadRequestError, "'s'", "batch size 2; got 3"):
        step("s", torch.randint(0, VOCAB, (3, 1)))
    with rejected(BadRequestError, "'s'", "layers 0:3"):
        step("s", hidden(length=1), start=1, embed=False)
    with rejected(SequenceTooLongError, "would hold 9 tokens", "max_length=8"):
        step("s", env.ids[:, 8:12])
    with rejected(BadRequestError, "attention_mask", "past+T=6", "(2, 1)"):  # mask must cover the history too
        step("s", ids[:, 5:6], tensors={"attention_mask": torch.ones(2, 1, dtype=torch.int64)})
    # the rejected steps left the session intact: its steps equal one local forward of the whole sequence
    second, reply = step("s", ids[:, 5:8])
    assert reply["length"] == 8
    got = torch.cat([first, second], dim=1)
    assert (got - local_hidden(env, ids, 3)).abs().max().item() <= 1e-5
    _, reply = rpc(env, node, INFERENCE, {}, {"session_id": "s", "close": True})
    assert reply["closed"]
    with rejected(UnknownSessionError, "'s'"):
        step("s", ids[:, :1])
    assert_serves(env)


# ---- payload size -------------------------------------------------------------------------------------------

def test_oversize_payload_is_refused_by_a_limited_node(env):
    x = hidden(batch=80, length=256)  # 5 MiB, over the limited node's 100 kB and hivemind's 4 MiB message cap
    assert x.numel() * x.element_size() > 4 * MiB
    with rejected(PayloadTooLargeError, f"limit of {LIMITED_REQUEST_BYTES} bytes"):
        rpc(env, env.limited, FORWARD, {"inputs": x}, {"start": 0, "end": 6}, client=env.limited_client, timeout_s=60)
    assert_serves(env)  # includes a small request to the limited node


def test_large_requests_stream_past_the_message_cap(env):
    batch, length = 64, NODE_MAX_LENGTH  # batch × length = 16384, the default max_batch_tokens
    ids = torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1::4, :17] = 0  # left padding in every fourth row
    out, _ = rpc(env, env.first, FORWARD, {"inputs": ids, "attention_mask": mask}, {"start": 0, "end": 3, "embed": True},
                 timeout_s=120)
    x = out["outputs"]  # (64, 256, 64) = 4 MiB
    request_bytes = x.numel() * x.element_size() + mask.numel() * mask.element_size()
    assert request_bytes > 4 * MiB
    out, _ = rpc(env, env.second, FORWARD, {"inputs": x, "attention_mask": mask}, {"start": 3, "end": 6, "head": True},
                 timeout_s=120)
    logits = out["outputs"]
    assert logits.numel() * logits.element_size() > 4 * MiB  # (64, 256, 128) = 8 MiB back
    with torch.no_grad():
        want = env.ref(ids, attention_mask=mask).logits
    assert (logits - want).abs().max().item() <= 1e-5
    assert_serves(env)


# ---- hooks and backward -------------------------------------------------------------------------------------

def test_unknown_hook_kind(env):
    x, payload = hidden(), torch.frombuffer(bytearray(b"opaque"), dtype=torch.uint8)
    meta = {"start": 0, "end": 3}
    with rejected(HookError, "'no-such-hook' v3", "it serves"):
        rpc(env, env.first, FORWARD, {"inputs": x, "hook_payload": payload}, {**meta, "hook": {"kind": "no-such-hook", "version": 3}})
    with rejected(BadRequestError, "meta['hook'] must be {'kind': str, 'version': int}"):
        rpc(env, env.first, FORWARD, {"inputs": x, "hook_payload": payload}, {**meta, "hook": {"kind": "x", "version": "3"}})
    with rejected(BadRequestError, "'hook_payload' as a 1D uint8 tensor"):
        rpc(env, env.first, FORWARD, {"inputs": x}, {**meta, "hook": {"kind": "x", "version": 1}})
    assert_serves(env)


def test_backward_rejects_mismatched_grad_outputs(env):
    x, meta = hidden(), {"start": 3, "end": 6}
    with rejected(BadRequestError, "grad_outputs must be torch.float32 (2, 5, 64)", "got torch.float32 (2, 4, 64)"):
        rpc(env, env.second, BACKWARD, {"inputs": x, "grad_outputs": hidden(length=4)}, meta)
    with rejected(BadRequestError, "grad_outputs must be torch.float32 (2, 5, 64)", "got torch.int64 (2, 5, 64)"):
        rpc(env, env.second, BACKWARD, {"inputs": x, "grad_outputs": hidden(dtype=torch.int64)}, meta)
    with rejected(BadRequestError, "needs a 'grad_outputs'"):
        rpc(env, env.second, BACKWARD, {"inputs": x}, meta)
    with rejected(BadRequestError, "Backward through the embedding"):
        rpc(env, env.first, BACKWARD, {"inputs": env.ids[:, :5], "grad_outputs": hidden()},
            {"start": 0, "end": 3, "embed": True})
    out, _ = rpc(env, env.second, BACKWARD, {"inputs": x, "grad_outputs": hidden()}, meta)  # well-formed: served
    assert out["outputs"].shape == x.shape
    assert_serves(env)


# ---- fuzz ---------------------------------------------------------------------------------------------------

_JUNK = [None, True, -1, 0, 3, 7, 2 ** 40, 0.5, "", "x" * 300, "inputs", [], [1, "a"], {"a": 1}, {"max_length": -2},
         b"\x00\xff"]


def _random_tensor(rng: random.Random) -> runtime_pb2.Tensor:
    dtype = rng.choice(sorted(ALLOWED_DTYPES) + ["float64", "complex64", "", "garbage"])
    size = [rng.choice([0, 1, 2, 5, 9, 2 ** 31]) for _ in range(rng.randint(0, 3))]
    return runtime_pb2.Tensor(buffer=rng.randbytes(rng.randint(0, 300)), size=size, dtype=dtype,
                              chunks=rng.randint(0, 3), requires_grad=rng.random() < 0.5)


def _garbage_frame(rng: random.Random, i: int) -> list[runtime_pb2.ExpertRequest]:
    """Seeded garbage of four kinds: random metadata bytes, random chunk layouts, random msgpack headers,
    and well-framed tensors of hidden sizes the node cannot take with random request fields."""
    kind = i % 4
    if kind == 0:
        messages = [runtime_pb2.ExpertRequest(metadata=rng.randbytes(rng.randint(1, 64)))]
        return messages + [runtime_pb2.ExpertRequest(tensors=[_random_tensor(rng)]) for _ in range(rng.randint(0, 2))]
    if kind == 1:
        parts = [rng.randint(1, 3) for _ in range(rng.randint(1, 3))]
        chunks = [runtime_pb2.ExpertRequest(tensors=[_random_tensor(rng) for _ in range(rng.choice([1, 1, 1, 0, 2]))])
                  for _ in range(rng.randint(0, sum(parts) + 1))]
        return [header({"names": rng.sample(sorted(TENSOR_NAMES), len(parts)), "start": 0, "end": 3}, parts)] + chunks
    if kind == 2:
        head = {rng.choice(["v", "meta", "parts", "junk"]): rng.choice(_JUNK) for _ in range(rng.randint(0, 4))}
        return [runtime_pb2.ExpertRequest(metadata=msgpack.packb(head, use_bin_type=True))]
    dim = rng.choice([1, HIDDEN - 1, HIDDEN + 1])
    tensors = [torch.randn(rng.randint(1, 3), rng.randint(1, 6), dim) for _ in range(rng.randint(1, 2))]
    meta = {key: rng.choice(_JUNK) for key in rng.sample(["start", "end", "embed", "head", "session_id", "open",
                                                            "hook", "close"], rng.randint(0, 5))}
    meta["names"] = ["inputs", "grad_outputs"][:len(tensors)]
    meta.pop("close", None)  # a close request needs no tensors and would be answered normally
    return frame(tensors, meta)


def test_random_garbage_frames_get_typed_errors(env):
    rng = random.Random(20240617)
    seen = []
    for i in range(20):
        node = rng.choice([env.first, env.second])
        handle = rng.choice([FORWARD, BACKWARD, INFERENCE])
        messages = _garbage_frame(rng, i)
        t0 = time.monotonic()
        with pytest.raises(SwarmError) as info:
            raw(env, node, messages, handle, timeout_s=10)
        err = info.value
        # a typed complaint about the request: not a hang (PeerUnreachableError), not a node bug (InternalNodeError)
        assert isinstance(err, BadRequestError), f"frame {i} to {handle}: {type(err).__name__}: {err}"
        assert err.message and time.monotonic() - t0 < 10
        seen.append(type(err).__name__)
    assert len(seen) == 20
    assert_serves(env)
