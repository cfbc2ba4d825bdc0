"""A seeded generator of random hybrid requests over the whole op whitelist, for fuzzing nodes (issue 10).

:class:`GraphFuzzer` draws small graphs whose ops come from every list of :mod:`hybrid.ops` (each torch function,
tensor method and operator, with arguments shaped like that op's signature most of the time and random otherwise),
plus getters and setters on a tiny 4-layer Llama's modules, ``module`` calls, session ``load``\\ s and ``keep``\\ s,
Python scalars and containers, odd shapes and dtypes (0-dim, empty, bool, int8, bfloat16...), non-finite values,
and sizes far past any budget that a node must refuse before allocating. A share of requests is then corrupted:
a node field replaced by a random JSON value, or the wire bytes flipped, cut or padded.

:meth:`GraphFuzzer.request` returns the span hook payload a node receives (``hybrid.request`` wire form) and the
hook carry of an earlier hop (``hook_carry``).
"""

from __future__ import annotations

import json
import random
import struct
from typing import Any

import torch

from hybrid import ops
from hybrid.ir import Graph, Limits, Ref
from hybrid.planner import Executor, Plan
from hybrid.request import encode_request
from hybrid.values import pack_values

LAYERS = 4
#: Module paths of the tiny Llama (SpanModel naming) that getters, setters and module calls name, plus bad ones.
MODULES = ["model.embed_tokens", "model.rotary_emb", "model.norm", "lm_head", "nonsense", "model.layers.9",
           "model.layers", ""] + [
    f"model.layers.{i}{sub}" for i in range(LAYERS) for sub in
    ("", ".self_attn", ".self_attn.q_proj", ".self_attn.o_proj", ".mlp", ".mlp.down_proj", ".mlp.act_fn",
     ".input_layernorm")]
CALLABLE_MODULES = ["lm_head", "model.norm", "model.layers.0.mlp", "model.layers.1.self_attn.q_proj",
                    "model.embed_tokens", "model.layers.2", "model.rotary_emb", "model.layers.3.mlp.act_fn", "nope"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
          torch.int8, torch.uint8, torch.bool]
SHAPES = [(), (0,), (1,), (3,), (2, 3), (3, 1, 4), (1, 3, 64), (2, 0, 3), (4, 4), (1, 1), (5, 2, 1, 2), (64,),
          (1, 3, 128), (128, 64)]
HUGE = [1 << 20, 1 << 31, 10 ** 12, 2 ** 62, 1 << 40]
SESSION_KEYS = ["fuzz:a", "fuzz:b", "fuzz:missing", "x" * 200]

#: Positional argument kinds by target (T tensor, X tensor-or-scalar, S scalar, d dim, n count, z sizes,
#: p permutation, D dtype, G index tensor, L list of tensors, I index, E einsum equation, P python value). Others get "T" plus random args.
SPECS: dict[str, str] = {
    "torch.softmax": "Td", "torch.log_softmax": "Td", "torch.cat": "Ld", "torch.stack": "Ld", "torch.matmul": "TT",
    "torch.einsum": "ETT", "torch.topk": "Tn", "torch.argmax": "Td", "torch.argmin": "Td", "torch.max": "Td",
    "torch.min": "Td", "torch.mean": "Td", "torch.sum": "Td", "torch.norm": "T", "torch.linalg.norm": "T",
    "torch.clamp": "TSS", "torch.where": "TXX", "torch.gather": "TdG", "torch.full_like": "TS",
    "torch.sort": "Td", "torch.cumsum": "Td", "torch.diff": "Tnd", "torch.allclose": "TT", "torch.flatten": "Tdd",
    "torch.squeeze": "Td", "torch.unsqueeze": "Td", "torch.transpose": "Tdd", "torch.nn.functional.softmax": "Td",
    "torch.nn.functional.log_softmax": "Td", "torch.nn.functional.layer_norm": "Tz",
    "torch.nn.functional.cosine_similarity": "TTd", "torch.nn.functional.kl_div": "TT",
    "torch.nn.functional.cross_entropy": "TT",
    "softmax": "Td", "log_softmax": "Td", "sum": "Td", "mean": "Td", "max": "Td", "min": "Td", "argmax": "Td",
    "topk": "Tnd", "sort": "Td", "cumsum": "Td", "std": "Td", "var": "Td", "norm": "TS", "pow": "TX",
    "clamp": "TSS", "add": "TX", "sub": "TX", "mul": "TX", "div": "TX", "matmul": "TT", "add_": "TX",
    "sub_": "TX", "mul_": "TX", "div_": "TX", "fill_": "TS", "copy_": "TT", "clamp_": "TSS", "masked_fill": "TTS",
    "masked_fill_": "TTS", "view": "Tz", "reshape": "Tz", "permute": "Tp", "transpose": "Tdd", "unsqueeze": "Td",
    "squeeze": "Td", "flatten": "Tdd", "expand": "Tz", "expand_as": "TT", "view_as": "TT", "reshape_as": "TT",
    "chunk": "Tnd", "split": "Tnd", "gather": "TdG", "index_select": "TdG", "size": "Td", "to": "TD",
    "eq": "TX", "ne": "TX", "lt": "TX", "le": "TX", "gt": "TX", "ge": "TX", "logsumexp": "Td", "amax": "Td",
    "amin": "Td", "diff": "Tnd", "roll": "Tnd", "flip": "Tz", "__getitem__": "TI", "__setitem__": "TIX",
    "getitem": "PI", "setitem": "PIX", "neg": "P", "pos": "P", "abs": "P", "invert": "P",
}
#: A valid call of the ops whose random arguments rarely fit (tensors as shapes; a bool or int64 dtype where named).
EXAMPLES: dict[str, list] = {
    "torch.einsum": ["i,i->", (3,), (3,)], "torch.nn.functional.layer_norm": [(2, 3), [3]],
    "torch.bmm": [(2, 3, 4), (2, 4, 5)], "torch.index_select": [(3, 4), 0, ((2,), torch.int64)],
    "torch.nn.functional.linear": [(2, 3), (4, 3)], "torch.nn.functional.one_hot": [((2, 3), torch.int64), 5],
    "torch.nn.functional.rms_norm": [(2, 3), [3]], "torch.outer": [(3,), (4,)],
    "torch.take_along_dim": [(2, 3), ((2, 3), torch.int64), 1],
    "torch.where": [((2, 3), torch.bool), (2, 3), 0.0], "expand": [(1, 3), 2, 3], "neg": [(2, 3)],
    "masked_fill": [(2, 3), ((2, 3), torch.bool), 1.0], "masked_fill_": [(2, 3), ((1, 3), torch.bool), 1.0],
    "torch.gather": [(2, 3), 1, ((2, 2), torch.int64)], "gather": [(2, 3), 1, ((2, 2), torch.int64)],
    "index_select": [(2, 3), 1, ((2,), torch.int64)], "torch.nn.functional.kl_div": [(2, 3), (2, 3)],
    "reshape": [(2, 3), 3, 2], "permute": [(2, 3, 4), 2, 0, 1], "torch.diff": [(4,)],
    "torch.nn.functional.cross_entropy": [(2, 3), ((2,), torch.int64)], "item": [(1,)],
}
BINARY_OPERATORS = {"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "lt", "le", "gt", "ge", "eq",
                    "ne", "and_", "or_", "xor", "iadd", "isub", "imul", "itruediv"}
TARGETS = {"function": sorted(ops.FUNCTIONS), "method": sorted(ops.METHODS), "operator": sorted(ops.OPERATORS)}
#: Names outside the whitelist that a hostile graph may try (each must be a DisallowedOpError).
FORBIDDEN = {"function": ["torch.load", "os.system", "torch.zeros", "torch.randn", "eval", "torch.empty"],
             "method": ["numpy", "__class__", "data_ptr", "storage", "tolist", "__reduce__", "cuda", "share_memory_"],
             "operator": ["call", "attrgetter", "setattr", "delitem", "contains", "lshift"]}


class GraphFuzzer:
    """Random hybrid requests for one node serving the tiny Llama's stages 0..5 (embed, 4 layers, head) whole.

    Args:
        seed: everything drawn follows from it.
        corrupt: share of requests whose JSON or bytes are then corrupted.
    """

    def __init__(self, seed: int, corrupt: float = 0.08) -> None:
        self.rng = random.Random(seed)
        self.corrupt = corrupt
        self.gen = torch.Generator().manual_seed(seed)

    # ---- requests -----------------------------------------------------------------------------------------

    def request(self) -> tuple[bytes, bytes]:
        """``(payload, carry)``: one span hook payload, and the hook carry (values of an earlier hop, as a chained
        forward sends them in ``hook_carry``; usually empty, sometimes corrupted)."""
        r = self.rng
        graph, _ = self.graph()
        saved = [n.id for n in graph.nodes if n.save]
        carry = saved if r.random() < 0.9 else r.sample(range(len(graph.nodes) + 2), k=min(3, len(graph.nodes)))
        keep = {}
        if r.random() < 0.08 and graph.nodes:
            keep = {r.randrange(len(graph.nodes)): r.choice(SESSION_KEYS[:2])}
        call = 0 if r.random() < 0.97 else r.choice([1, 7])
        plan = Plan([Executor("n", 0, LAYERS + 1)], [0] * len(graph.nodes), [carry], [])
        payload = encode_request(graph, plan, 0 if r.random() < 0.98 else r.choice([1, -1]), call, keep)
        if r.random() < self.corrupt:
            payload = self._corrupt_json(payload) if r.random() < 0.6 else self._corrupt_bytes(payload)
        return payload, self._carry(graph)

    def _carry(self, graph: Graph) -> bytes:
        r = self.rng
        if r.random() < 0.95 or not graph.nodes:
            return b""
        values = {r.randrange(len(graph.nodes) + 2): r.choice([self._tensor(), 3, [1.5, None], (self._tensor(),)])
                  for _ in range(r.randint(1, 3))}
        carry = pack_values(values)
        if r.random() < 0.5:
            carry = self._corrupt_bytes(carry) if r.random() < 0.5 else carry.replace(b'"', b"'", 1)
        return carry

    def graph(self) -> tuple[Graph, list[str]]:
        r = self.rng
        graph = Graph(limits=self._limits())
        self.values: list[int] = []  # node ids with a value, to refer to
        used: list[str] = []
        for _ in range(r.choice([1, 1, 2, 2, 3, 3, 4, 5, 6, 8])):
            kind = r.random()
            if kind < 0.2 or not self.values:
                if r.random() < 0.6:
                    node = graph.add("getter", module=self._module(), kind=self._kind(), call=self._call())
                else:
                    node = graph.add("function", target=r.choice(["torch.zeros_like", "torch.ones_like"]),
                                     args=[self._attachment(graph)])
                    used.append(f"function:{node.target}")
            elif kind < 0.27:
                node = graph.add("setter", module=self._module(), kind=self._kind(), call=self._call(),
                                 args=[self._arg("X", graph)])
                used.append("setter")
                continue
            elif kind < 0.31:
                node = graph.add("module", module=r.choice(CALLABLE_MODULES),
                                 args=[self._arg("T", graph) for _ in range(r.choice([1, 1, 2]))])
                used.append("module")
            elif kind < 0.34:
                node = graph.add("load", target=r.choice(SESSION_KEYS))
                used.append("load")
            else:
                op = r.choice(["function", "method", "method", "operator", "operator"])
                target = r.choice(FORBIDDEN[op]) if r.random() < 0.02 else r.choice(TARGETS[op])
                args, kwargs = self._call_args(op, target, graph)
                node = graph.add(op, target=target, args=args, kwargs=kwargs)
                used.append(f"{op}:{target}")
            node.save = r.random() < 0.35
            self.values.append(node.id)
        return graph, used

    def _limits(self) -> Limits:
        r = self.rng
        if r.random() < 0.85:
            return Limits()
        return Limits(max_ops=r.choice([1, 3, 10_000]), max_attachment_bytes=r.choice([0, 100, 64 << 20]),
                      max_elements=r.choice([0, 10, 1000, 1 << 28]), max_wall_s=r.choice([0.0, 0.5, 60.0]),
                      max_live_bytes=r.choice([0, 1000, 8 << 30]), max_save_bytes=r.choice([0, 100, 4 << 30]))

    # ---- arguments ----------------------------------------------------------------------------------------

    def _call_args(self, op: str, target: str, graph: Graph) -> tuple[list, dict]:
        r = self.rng
        spec = SPECS.get(target, "T" if op == "method" else ("XX" if target in BINARY_OPERATORS else "T"))
        if op == "operator" and target in ("neg", "pos", "abs", "invert"):
            spec = "X" if r.random() < 0.7 else "P"
        if r.random() < 0.12:  # a random arity
            spec = spec[:r.randint(0, len(spec))] + "".join(r.choice("TXSdnzDIP") for _ in range(r.randint(0, 2)))
            if op == "method" and not spec.startswith("T"):
                spec = "T" + spec
        if target in EXAMPLES and r.random() < 0.5:
            args = [self._example(a, graph) for a in EXAMPLES[target]]
            if op == "method":  # called on a value of the graph
                args[0] = Ref(graph.add("method", target="clone", args=[Ref(self._copy(args[0], graph))]).id)
            return args, {}
        args = [self._arg(code, graph) for code in spec]
        if op == "method" and self.values and r.random() < 0.97:
            args[0] = self._ref()
        if target in ("view", "reshape", "permute", "expand") and len(args) == 2 and isinstance(args[1], list) \
                and r.random() < 0.5:
            args = [args[0], *args[1]]  # sizes (or dims) as separate ints
        kwargs = {}
        if r.random() < 0.15:
            name = r.choice(["dim", "keepdim", "dtype", "out", "bogus", "p", "eps", "value"])
            kwargs[name] = {"dim": self._dim, "keepdim": lambda: r.random() < 0.5, "dtype": lambda: r.choice(DTYPES),
                            }.get(name, lambda: self._arg("P", graph))()
        return args, kwargs

    def _arg(self, code: str, graph: Graph) -> Any:
        r = self.rng
        if code in "TX" and self.values and r.random() < (0.85 if code == "T" else 0.5):
            return self._ref()
        if code == "T":
            return self._attachment(graph)
        if code in "XS":
            return self._scalar()
        if code == "d":
            return self._dim()
        if code == "n":
            return r.choice([0, 1, 2, 3, -1, r.choice(HUGE)]) if r.random() < 0.9 else self._ref_or(1)
        if code == "z":
            sizes = [r.choice([-1, 1, 2, 3, 4, 64, 0, r.choice(HUGE)]) for _ in range(r.randint(0, 4))]
            return sizes if r.random() < 0.92 else [self._ref_or(2)]
        if code == "D":
            return r.choice(DTYPES)
        if code == "p":  # a permutation of 0..k-1 (k dims), sometimes repeated or out of range
            dims = list(range(r.randint(0, 4)))
            r.shuffle(dims)
            return dims if r.random() < 0.8 else dims + [r.choice([0, 5, -1])]
        if code == "G":  # an index tensor: zeros (in range for any size) of a random shape, or a value's own
            return graph.attach(torch.zeros(r.choice(SHAPES), dtype=torch.int64)) if r.random() < 0.7 \
                else self._arg("T", graph)
        if code == "L":
            return [self._arg("T", graph) for _ in range(r.randint(0, 4))]
        if code == "I":
            return self._index(graph)
        if code == "E":
            return r.choice(["ij,jk->ik", "bij,bjk->bik", "i,i->", "...d,...d->...", "ii->i", "bad", "i,j->ij"])
        return self._python(graph)

    @staticmethod
    def _copy(attachment: Any, graph: Graph) -> int:
        """A node holding a copy of ``attachment`` (a method's target must be a node's value)."""
        return graph.add("operator", target="getitem", args=[attachment, Ellipsis]).id

    def _example(self, arg: Any, graph: Graph) -> Any:
        if isinstance(arg, tuple) and arg and isinstance(arg[0], tuple):  # (shape, dtype)
            return graph.attach(torch.zeros(arg[0], dtype=arg[1]))
        if isinstance(arg, tuple):
            return graph.attach(torch.randn(arg, generator=self.gen))
        return arg

    def _ref(self) -> Ref:
        r = self.rng
        return Ref(self.values[-1] if r.random() < 0.5 else r.choice(self.values))

    def _ref_or(self, default: Any) -> Any:
        return self._ref() if self.values else default

    def _dim(self) -> int:
        return self.rng.choice([-1, 0, 1, 2, -2, 3, -4, 7])

    def _scalar(self) -> Any:
        r = self.rng
        return r.choice([0, 1, 2, -3, 0.5, -1.5, 1e30, float("inf"), float("-inf"), float("nan"), True, False,
                         2 ** 62, -(2 ** 63) + 1, 10 ** 7, 1e-30, 255, None])

    def _python(self, graph: Graph) -> Any:
        r = self.rng
        kind = r.randrange(8)
        if kind == 0:
            return [r.randint(-2, 5) for _ in range(r.randint(0, 5))]
        if kind == 1:
            return tuple(r.choice([0, 1, 2]) for _ in range(r.randint(0, 3)))
        if kind == 2:
            return r.choice(["", "a", "abc" * 10, "x" * 4000])
        if kind == 3:
            return [[1, 2], [3, [4, self._scalar()]]]
        if kind == 4:
            return {"a": self._scalar(), "ref": 1}
        if kind == 5 and self.values:
            return self._ref()
        return self._scalar()

    def _index(self, graph: Graph) -> Any:
        r = self.rng

        def one() -> Any:
            k = r.randrange(7)
            return [r.randint(-4, 4), slice(r.choice([None, 0, 1, -1]), r.choice([None, 2, -1, 10 ** 9]),
                                                     r.choice([None, 1, 2])),
                    Ellipsis, None, self._ref_or(0), [0, 1, -1], r.choice(HUGE)][k]
        return one() if r.random() < 0.5 else tuple(one() for _ in range(r.randint(0, 3)))

    def _attachment(self, graph: Graph) -> Any:
        """A small tensor of an odd shape and dtype, from a pool of 256 drawn once (drawing each costs more than
        running most graphs)."""
        if not hasattr(self, "_pool"):
            self._pool = [self._tensor() for _ in range(256)]
        return graph.attach(self.rng.choice(self._pool))

    def _tensor(self) -> torch.Tensor:
        r = self.rng
        shape, dtype = r.choice(SHAPES), r.choice(DTYPES) if r.random() < 0.4 else torch.float32
        if dtype == torch.bool:
            t = torch.rand(shape, generator=self.gen) < 0.5
        elif dtype.is_floating_point:
            t = (torch.randn(shape, generator=self.gen) * r.choice([1.0, 1e4, 1e-4])).to(dtype)
            if t.numel() and r.random() < 0.1:
                t.view(-1)[0] = r.choice([float("nan"), float("inf")])
        else:
            lo = 0 if dtype == torch.uint8 else -5
            t = torch.randint(lo, r.choice([5, 128, 127]), shape, generator=self.gen, dtype=torch.int64).to(dtype)
        return t

    def _module(self) -> str:
        return self.rng.choice(MODULES) if self.rng.random() < 0.9 else self.rng.choice(MODULES[:4])

    def _kind(self) -> str:
        return "output" if self.rng.random() < 0.7 else ("input" if self.rng.random() < 0.97 else "weights")

    def _call(self) -> int:
        return 0 if self.rng.random() < 0.95 else self.rng.choice([1, -1])

    # ---- corruption ---------------------------------------------------------------------------------------

    def _corrupt_json(self, payload: bytes) -> bytes:
        """Replace one field of one graph node by a random JSON value (the bytes around it stay well formed)."""
        r = self.rng
        (plan_len,) = struct.unpack("<Q", payload[4:12])
        head, graph = payload[:12 + plan_len], payload[12 + plan_len:]
        (length,) = struct.unpack("<Q", graph[8:16])
        doc = json.loads(graph[16:16 + length])
        wild = [None, -1, 2 ** 70, "getter", "x" * 10, [], {}, [{"ref": 0}], {"ref": 10 ** 6}, {"tensor": 99},
                {"ref": -1}, {"slice": [1]}, {"dtype": "complex128"}, {"float": "1e999"}, {"tuple": 1}, 1.5, True,
                [[[[[]]]]], {"dict": []}, "method", "output"]
        target = r.choice(doc["nodes"] + [doc, doc["limits"]])
        field = r.choice(["op", "target", "args", "kwargs", "module", "kind", "call", "save", "id", "site",
                          "max_ops", "max_elements", "version", "nodes", "limits", "max_wall_s"])
        target[field] = r.choice(wild)
        text = json.dumps(doc).encode()
        return head + graph[:4] + struct.pack("<IQ", struct.unpack("<I", graph[4:8])[0], len(text)) + text + \
            graph[16 + length:]

    def _corrupt_bytes(self, payload: bytes) -> bytes:
        r = self.rng
        data = bytearray(payload)
        for _ in range(r.randint(1, 4)):
            kind = r.random()
            if kind < 0.5 and data:
                data[r.randrange(len(data))] = r.randrange(256)
            elif kind < 0.75 and data:
                del data[r.randrange(len(data))]
            else:
                data.insert(r.randrange(len(data) + 1), r.randrange(256))
        return bytes(data if r.random() < 0.95 else data[:r.randrange(len(data) + 1)])

