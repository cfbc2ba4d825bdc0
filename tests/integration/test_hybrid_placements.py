"""One experiment, every placement: saved values equal plain PyTorch hooks and real nnsight (fp32, max abs diff
<= 1e-5) on a real 3-node SmolLM2 swarm (spans 0:10, 10:20, 20:30) and on a one-node deployment; ``hybrid`` brings
back only the saved values in one round trip; concurrent requests on one swarm never see each other.

Each experiment is one function whose ``with`` block runs unchanged on our ``hybrid.LanguageModel`` and on
``nnsight.LanguageModel`` (nnsight compiles the block from this file). Every local computation runs on one torch
thread, as the nodes do, so reductions happen in the same order everywhere.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import hybrid
from hybrid.errors import DisallowedOpError, HybridError
from hybrid.tracing import nnsight_position_ids

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

PLACEMENTS = ["local", "hybrid", "centralized", "swarm"]
D = 576  # SmolLM2-135M hidden size
TOL = 1e-5

PROMPTS = ["The Eiffel Tower is located in the city of", "My favourite food is",
           "Once upon a time, there was a little"]                          # 10, 4 and 9 tokens: left-padded
CITIES = ["The Eiffel Tower is located in the city of", "The Brandenburg Gate is located in the city of",
          "The Colosseum is located in the city of", "Big Ben is located in the city of"]   # 10, 10, 10, 8 tokens
PARIS, BERLIN, ROME, LONDON = 7042, 11452, 7268, 4528
PICK = torch.tensor([[PARIS, BERLIN], [BERLIN, PARIS], [ROME, LONDON], [LONDON, ROME]])  # (B, 2): right, wrong
READ_LAYERS = (3, 14, 27)     # one on each node
PATCH_LAYER = 12
STEER_LAYER = 9               # the last layer of the first node
STEER = torch.randn(D, generator=torch.Generator().manual_seed(0)) * 8


# ---- deployments and references ------------------------------------------------------------------------------


class Hooks:
    """Plain transformers with ``register_forward_hook``: the independent reference."""

    def __init__(self, path: Path):
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    def run(self, prompts: list[str], hooks: dict[str, Callable] | None = None,
            pre_hooks: dict[str, Callable] | None = None) -> torch.Tensor:
        """Logits (B, T, V) of the left-padded batch with nnsight's position ids, under ``hooks``."""
        encoded = self.tokenizer(prompts, padding=True, return_tensors="pt")
        ids, mask = encoded["input_ids"], encoded["attention_mask"]
        handles = [self.model.get_submodule(p).register_forward_hook(f) for p, f in (hooks or {}).items()]
        handles += [self.model.get_submodule(p).register_forward_pre_hook(f, with_kwargs=True)
                    for p, f in (pre_hooks or {}).items()]
        try:
            with torch.no_grad():
                return self.model(input_ids=ids, attention_mask=mask, position_ids=nnsight_position_ids(mask)).logits
        finally:
            for handle in handles:
                handle.remove()

    def shape(self, prompts: list[str]) -> tuple[int, int]:
        return tuple(self.tokenizer(prompts, padding=True, return_tensors="pt")["input_ids"].shape)


@pytest.fixture(scope="module")
def hooks(smollm2_dir):
    return Hooks(smollm2_dir)


@pytest.fixture(scope="module")
def refs():
    """Reference results computed once per module: ``{name: value}``."""
    return {}


def cached(refs: dict, key: str, compute: Callable[[], Any]) -> Any:
    if key not in refs:
        refs[key] = compute()
    return refs[key]


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str = "") -> None:
    got, want = got.detach(), want.detach()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got - want).abs().max().item()
    assert diff <= TOL, f"{what}: max abs diff {diff:.3g} > {TOL}"


def assert_costs(placement: str, stats: dict) -> None:
    """What every trace costs in its placement, whatever the experiment."""
    if placement == "local":
        assert stats["route"] == ["local"] and stats["client_bytes_received"] == 0
    elif placement in ("hybrid", "centralized"):
        # the nodes of the route, then the client when it ran the head on the last hidden state (head_on)
        nodes = [e for e in stats["route"] if e != "client"]
        assert (stats["route"][-1] == "client") == (stats["head_on"] == "client"), stats
        assert stats["round_trips"] == 1 and len(nodes) == len(stats["compute_s"]), stats
        if placement == "hybrid":
            assert stats["node_bytes"] > 0 and len(nodes) == 3, stats
        else:
            assert stats["node_bytes"] == 0 and len(nodes) == 1, stats
    else:
        assert stats["route"] == ["client"] and stats["round_trips"] >= 1, stats


# ---- the experiments: one with-block for nnsight and for every placement -------------------------------------

def read(lm, *, inside: bool = True, **placement):
    """Layer inputs/outputs (and attention and MLP outputs, ``inside``) of three layers, and the logits."""
    out: dict = {}
    with lm.trace(PROMPTS, **placement) as tracer:
        for k in READ_LAYERS:
            out[f"{k}.input"] = lm.model.layers[k].input.save()
            if inside:
                out[f"{k}.attn"] = lm.model.layers[k].self_attn.output[0].save()
                out[f"{k}.mlp"] = lm.model.layers[k].mlp.output.save()
            out[f"{k}.output"] = lm.model.layers[k].output.save()
        out["logits"] = lm.lm_head.output.save()
    return out, tracer


def patch(lm, **placement):
    """Patch position 3 of row 0 into row 1 at a middle layer; next-token probabilities at the last position."""
    with lm.trace(CITIES, **placement) as tracer:
        h = lm.model.layers[PATCH_LAYER].output
        h[1, 3, :] = h[0, 3, :]
        probs = lm.lm_head.output[:, -1].softmax(-1).save()
    return probs, tracer


def zero_ablate(lm, **placement):
    """Zero two MLP outputs, by assignment and in place."""
    with lm.trace(PROMPTS, **placement) as tracer:
        lm.model.layers[5].mlp.output = 0
        lm.model.layers[15].mlp.output[:] = 0
        logits = lm.lm_head.output[:, -1].save()
    return logits, tracer


def mean_ablate(lm, **placement):
    """Replace a layer's output by its mean over the batch."""
    with lm.trace(PROMPTS, **placement) as tracer:
        h = lm.model.layers[8].output
        h[:] = h.mean(0)
        logits = lm.lm_head.output[:, -1].save()
    return logits, tracer


def steer(lm, **placement):
    """Add a fixed random vector to one layer's output; the top-5 next tokens."""
    with lm.trace(PROMPTS, **placement) as tracer:
        lm.model.layers[STEER_LAYER].output = lm.model.layers[STEER_LAYER].output + STEER
        logits = lm.lm_head.output[:, -1].save()
        top = lm.lm_head.output[:, -1].topk(5).indices.save()
    return (logits, top), tracer


def logit_diff(lm, **placement):
    """The patch, then right − wrong city logit at the last position, computed where the logits are: (B,)."""
    with lm.trace(CITIES, **placement) as tracer:
        h = lm.model.layers[PATCH_LAYER].output
        h[1, 3, :] = h[0, 3, :]
        pair = lm.lm_head.output[:, -1, :].gather(1, PICK)
        diff = (pair[:, 0] - pair[:, 1]).save()
    return diff, tracer


def invokes(lm, **placement):
    """Three invokes (10 tokens; 4 and 9 tokens; an empty one seeing the whole batch), padded together."""
    with lm.trace(**placement) as tracer:
        with tracer.invoke(PROMPTS[0]):
            first = lm.model.layers[8].output.save()
            first_logits = lm.lm_head.output[:, -1].save()
        with tracer.invoke(PROMPTS[1:]):
            lm.model.layers[8].output[:, -1, :] = 0
            lm.model.layers[20].output = lm.model.layers[20].output * 0.5
            rest_logits = lm.lm_head.output[:, -1].save()
        with tracer.invoke():
            all_logits = lm.lm_head.output[:, -1].save()
    return (first, first_logits, rest_logits, all_logits), tracer


def nnsight_run(ns, experiment: Callable, **kwargs) -> Any:
    result, _ = experiment(ns, **kwargs)
    return result


# ---- 1. reading ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("placement", PLACEMENTS)
def test_read_layer_attention_and_mlp_outputs(placement, lm_for, hooks, ns, refs):
    def by_hooks():
        seen: dict = {}

        def keep(name: str, part: Callable = lambda o: o):
            return lambda module, args, output: seen.__setitem__(name, part(output).clone())

        fwd, pre = {}, {}
        for k in READ_LAYERS:
            pre[f"model.layers.{k}"] = lambda m, args, kwargs, k=k: seen.__setitem__(f"{k}.input", args[0].clone())
            fwd[f"model.layers.{k}.self_attn"] = keep(f"{k}.attn", lambda o: o[0])
            fwd[f"model.layers.{k}.mlp"] = keep(f"{k}.mlp")
            fwd[f"model.layers.{k}"] = keep(f"{k}.output")
        seen["logits"] = hooks.run(PROMPTS, fwd, pre)
        return seen

    want = cached(refs, "read.hooks", by_hooks)
    theirs = cached(refs, "read.nnsight", lambda: nnsight_run(ns, read))
    inside = placement != "swarm"
    got, tracer = read(lm_for(placement), inside=inside, placement=placement)
    assert set(got) == {k for k in want if inside or k == "logits" or k.endswith((".input", ".output"))}
    for name, value in got.items():
        assert isinstance(value, torch.Tensor), f"{name} is {type(value).__name__} after the block"
        assert_close(value, want[name], f"{placement} {name} vs hooks")
        assert_close(value, theirs[name], f"{placement} {name} vs nnsight")
    assert_costs(placement, tracer.stats)


def test_swarm_placement_reaches_only_layer_boundaries(remote_lm):
    with pytest.raises(DisallowedOpError, match="Petals-style.*model.layers.3.mlp.*placement='hybrid'"):
        with remote_lm.trace(PROMPTS, placement="swarm"):
            remote_lm.model.layers[3].mlp.output.save()


def test_centralized_needs_one_node_serving_everything(remote_lm):
    with pytest.raises(HybridError, match="one node serving all 30 layers.*3 hops"):
        with remote_lm.trace(PROMPTS, placement="centralized"):
            remote_lm.lm_head.output.save()


# ---- 2. patching across prompts -------------------------------------------------------------------------------

@pytest.mark.parametrize("placement", PLACEMENTS)
def test_patch_across_prompts(placement, lm_for, hooks, ns, refs):
    def by_hooks():
        def hook(module, args, output):
            output[1, 3, :] = output[0, 3, :]
        return hooks.run(CITIES, {f"model.layers.{PATCH_LAYER}": hook})[:, -1].softmax(-1)

    want = cached(refs, "patch.hooks", by_hooks)
    theirs = cached(refs, "patch.nnsight", lambda: nnsight_run(ns, patch))
    clean = cached(refs, "cities.clean", lambda: hooks.run(CITIES))[:, -1].softmax(-1)
    probs, tracer = patch(lm_for(placement), placement=placement)
    assert_close(probs, want, f"{placement} vs hooks")
    assert_close(probs, theirs, f"{placement} vs nnsight")
    assert (probs[1] - clean[1]).abs().max() > 1e-3  # the patch changed row 1 ...
    assert_close(probs[[0, 2, 3]], clean[[0, 2, 3]], "unpatched rows")  # ... and nothing else
    assert_costs(placement, tracer.stats)


# ---- 3. ablation ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("placement", ["local", "hybrid", "centralized"])
def test_zero_ablation_of_mlp_outputs(placement, lm_for, hooks, ns, refs):
    def by_hooks():
        def assign(module, args, output):
            return torch.zeros_like(output)

        def in_place(module, args, output):
            output[:] = 0
        return hooks.run(PROMPTS, {"model.layers.5.mlp": assign, "model.layers.15.mlp": in_place})[:, -1]

    want = cached(refs, "zero.hooks", by_hooks)
    theirs = cached(refs, "zero.nnsight", lambda: nnsight_run(ns, zero_ablate))
    logits, tracer = zero_ablate(lm_for(placement), placement=placement)
    assert_close(logits, want, f"{placement} vs hooks")
    assert_close(logits, theirs, f"{placement} vs nnsight")
    assert_costs(placement, tracer.stats)


def test_zero_ablation_of_an_mlp_is_out_of_reach_of_the_swarm_placement(remote_lm):
    with pytest.raises(DisallowedOpError, match="model.layers.5.mlp"):
        zero_ablate(remote_lm, placement="swarm")


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_mean_ablation_of_a_layer_output(placement, lm_for, hooks, ns, refs):
    def by_hooks():
        def hook(module, args, output):
            output[:] = output.mean(0)
        return hooks.run(PROMPTS, {"model.layers.8": hook})[:, -1]

    want = cached(refs, "mean.hooks", by_hooks)
    theirs = cached(refs, "mean.nnsight", lambda: nnsight_run(ns, mean_ablate))
    logits, tracer = mean_ablate(lm_for(placement), placement=placement)
    assert_close(logits, want, f"{placement} vs hooks")
    assert_close(logits, theirs, f"{placement} vs nnsight")
    assert_costs(placement, tracer.stats)


# ---- 4. steering ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("placement", PLACEMENTS)
def test_steering_vector(placement, lm_for, hooks, ns, refs):
    def by_hooks():
        logits = hooks.run(PROMPTS, {f"model.layers.{STEER_LAYER}": lambda m, a, output: output + STEER})[:, -1]
        return logits, logits.topk(5).indices

    want, want_top = cached(refs, "steer.hooks", by_hooks)
    theirs, their_top = cached(refs, "steer.nnsight", lambda: nnsight_run(ns, steer))
    clean_top = cached(refs, "prompts.clean", lambda: hooks.run(PROMPTS))[:, -1].topk(5).indices
    (logits, top), tracer = steer(lm_for(placement), placement=placement)
    assert_close(logits, want, f"{placement} vs hooks")
    assert_close(logits, theirs, f"{placement} vs nnsight")
    assert torch.equal(top, want_top) and torch.equal(top, their_top)
    assert not torch.equal(top, clean_top)  # the vector steers
    if placement != "local":
        assert tracer.stats["client_bytes_sent"] > STEER.numel() * 4  # it travelled as an attachment
    assert_costs(placement, tracer.stats)


# ---- 5. a metric computed on the node -------------------------------------------------------------------------

@pytest.mark.parametrize("placement", PLACEMENTS)
def test_logit_difference_computed_where_the_logits_are(placement, lm_for, hooks, ns, refs):
    def by_hooks():
        def hook(module, args, output):
            output[1, 3, :] = output[0, 3, :]
        pair = hooks.run(CITIES, {f"model.layers.{PATCH_LAYER}": hook})[:, -1].gather(1, PICK)
        return pair[:, 0] - pair[:, 1]

    want = cached(refs, "diff.hooks", by_hooks)
    theirs = cached(refs, "diff.nnsight", lambda: nnsight_run(ns, logit_diff))
    diff, tracer = logit_diff(lm_for(placement), placement=placement)
    assert diff.shape == (len(CITIES),)
    assert_close(diff, want, f"{placement} vs hooks")
    assert_close(diff, theirs, f"{placement} vs nnsight")
    assert diff[0] > 0  # the Eiffel Tower is in Paris
    stats = tracer.stats
    assert_costs(placement, stats)
    batch, tokens = hooks.shape(CITIES)
    hidden_bytes = batch * tokens * D * 4
    print(f"{placement}: client sent {stats['client_bytes_sent']} B, received {stats['client_bytes_received']} B, "
          f"node->node {stats['node_bytes']} B, round trips {stats['round_trips']}")
    if placement in ("hybrid", "centralized"):
        assert stats["client_bytes_received"] < 10_000
        assert stats["client_bytes_received"] < hidden_bytes / 10  # the hidden states never came back
    if placement == "hybrid":
        assert stats["node_bytes"] > 2 * hidden_bytes  # they went node -> node instead
    if placement == "swarm":
        # Petals-style: the client calls every hop itself, and the patched layer splits the middle node's span
        # (0:10, 10:13, 13:20, 20:30); every call brings the hidden states back.
        assert stats["round_trips"] == 4
        assert stats["client_bytes_received"] > 100_000
        assert stats["client_bytes_received"] >= 4 * hidden_bytes


# ---- 6. several invokes ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("placement", PLACEMENTS)
def test_several_invokes_of_different_lengths(placement, lm_for, hooks, ns, refs):
    def by_hooks():
        seen: dict = {}

        def layer8(module, args, output):
            seen["first"] = output[:1].clone()
            output[1:3, -1, :] = 0

        def layer20(module, args, output):
            return torch.cat([output[:1], output[1:3] * 0.5, output[3:]], dim=0)
        last = hooks.run(PROMPTS, {"model.layers.8": layer8, "model.layers.20": layer20})[:, -1]
        return seen["first"], last[:1], last[1:3], last

    want = cached(refs, "invokes.hooks", by_hooks)
    theirs = cached(refs, "invokes.nnsight", lambda: nnsight_run(ns, invokes))
    got, tracer = invokes(lm_for(placement), placement=placement)
    for name, value, ref, nn in zip(("first", "first_logits", "rest_logits", "all_logits"), got, want, theirs):
        assert_close(value, ref, f"{placement} {name} vs hooks")
        assert_close(value, nn, f"{placement} {name} vs nnsight")
    assert got[0].shape == (1, hooks.shape(PROMPTS)[1], D)
    assert_costs(placement, tracer.stats)


# ---- isolation ------------------------------------------------------------------------------------------------

def test_concurrent_requests_are_isolated(remote_lm, local_lm, hooks):
    """An intervened hybrid trace and clean forwards run at once on the same nodes, five times each: every clean
    result equals the local model, every intervened result equals the local placement, and the nodes serve the
    clean model afterwards (their weights were not touched)."""
    rows = CITIES[:3]  # one length: no padding, so the plain SwarmModel forward takes them as they are
    ids = hooks.tokenizer(rows, return_tensors="pt").input_ids
    clean = hooks.run(rows)
    client = remote_lm.client

    def ablated(lm, placement):
        with lm.trace(rows, placement=placement):
            for k in (2, 12, 22):
                lm.model.layers[k].mlp.output = 0
            last = lm.lm_head.output[:, -1].save()
        return last

    local_ablated = ablated(local_lm, "local")
    assert torch.equal(client(ids).logits, clean)
    results: dict[str, list] = {"clean": [], "ablated": []}
    failures: list[BaseException] = []

    def repeat(name: str, work: Callable[[], torch.Tensor]) -> None:
        try:
            for _ in range(5):
                results[name].append(work())
        except BaseException as e:  # reported by the main thread
            failures.append(e)

    threads = [threading.Thread(target=repeat, args=("ablated", lambda: ablated(remote_lm, "hybrid"))),
               threading.Thread(target=repeat, args=("clean", lambda: client(ids).logits))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=240)
    assert not failures, failures
    assert len(results["clean"]) == len(results["ablated"]) == 5
    for logits in results["clean"]:
        assert torch.equal(logits, clean)
    for last in results["ablated"]:
        assert_close(last, local_ablated, "hybrid ablation under concurrency vs local")
        assert (last - clean[:, -1]).abs().max() > 1e-2  # the ablation did happen
    assert torch.equal(client(ids).logits, clean)  # afterwards the nodes compute the clean model
    with remote_lm.trace(rows, placement="hybrid"):
        after = remote_lm.lm_head.output.save()
    assert_close(after, clean, "clean hybrid trace after the concurrent requests")


# ---- 7. generation with per-step interventions, and sessions -------------------------------------------------

GEN_PROMPTS = CITIES[:3]  # 10 tokens each: no padding, so transformers' and nnsight's positions agree
GEN_TOKENS = 4


def keeper(lm) -> Callable:
    """``save`` of the library ``lm`` belongs to: a list saved inside the trace keeps what is appended later."""
    if isinstance(lm, hybrid.LanguageModel):
        return hybrid.save
    import nnsight
    return nnsight.save


def generate_steered(lm, **placement):
    """A steering vector added at the last position of one layer on every step; the top token probability per
    step and the generated ids."""
    keep = keeper(lm)
    with lm.generate(GEN_PROMPTS, max_new_tokens=GEN_TOKENS, **placement) as tracer:
        top = keep([])
        for step in tracer.iter[:GEN_TOKENS]:
            lm.model.layers[STEER_LAYER].output[:, -1] += STEER
            top.append(lm.lm_head.output[:, -1].softmax(-1).max(-1).values)
        ids = tracer.result.save()
    return (top, ids), tracer


def generate_cross_step(lm, **placement):
    """A value read in step 0 is added on every step (``tracer.all()``) at a later layer; the greedy token per step."""
    keep = keeper(lm)
    with lm.generate(GEN_PROMPTS, max_new_tokens=3, **placement) as tracer:
        first = lm.model.layers[STEER_LAYER].output[:, -1]
        tokens = keep([])
        for step in tracer.all():
            lm.model.layers[PATCH_LAYER].output[:, -1] += first * 2
            tokens.append(lm.lm_head.output[:, -1].argmax(-1))
    return tokens, tracer


def session_patch(lm, **placement):
    """Two traces in one session: the first's last-position state at a layer replaces the second's."""
    with lm.session() as session:
        with lm.trace(CITIES[0], **placement):
            h = lm.model.layers[PATCH_LAYER].output[:, -1]
        with lm.trace(CITIES[2], **placement):
            lm.model.layers[PATCH_LAYER].output[:, -1] = h
            probs = lm.lm_head.output[:, -1].softmax(-1).save()
    return probs, session


def hooked_generate(hooks: Hooks, max_new_tokens: int, layer_hooks: dict[str, Callable]) -> torch.Tensor:
    """transformers' greedy ``generate`` on GEN_PROMPTS under forward hooks that see every step."""
    encoded = hooks.tokenizer(GEN_PROMPTS, padding=True, return_tensors="pt")
    handles = [hooks.model.get_submodule(p).register_forward_hook(f) for p, f in layer_hooks.items()]
    try:
        with torch.no_grad():
            return hooks.model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False)
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_generation_with_a_per_step_intervention(placement, lm_for, hooks, ns, refs):
    def by_hooks():
        top: list = []

        def steer_hook(module, args, output):
            output[:, -1] += STEER

        ids = hooked_generate(hooks, GEN_TOKENS, {
            f"model.layers.{STEER_LAYER}": steer_hook,
            "lm_head": lambda m, a, output: top.append(output[:, -1].softmax(-1).max(-1).values.clone())})
        return top, ids

    want_top, want_ids = cached(refs, "gen.hooks", by_hooks)
    their_top, their_ids = cached(refs, "gen.nnsight", lambda: nnsight_run(ns, generate_steered))
    clean_ids = cached(refs, "gen.clean", lambda: hooked_generate(hooks, GEN_TOKENS, {}))
    (top, ids), tracer = generate_steered(lm_for(placement), placement=placement)
    assert torch.equal(ids, want_ids) and torch.equal(ids, their_ids), (ids, want_ids, their_ids)
    assert ids.shape == (len(GEN_PROMPTS), 10 + GEN_TOKENS)
    assert not torch.equal(ids, clean_ids)  # the vector steers the continuation
    assert len(top) == len(want_top) == len(their_top) == GEN_TOKENS
    for step, (value, ref, nn) in enumerate(zip(top, want_top, their_top)):
        assert_close(value, ref, f"{placement} step {step} vs hooks")
        assert_close(value, nn, f"{placement} step {step} vs nnsight")
    if placement in ("hybrid", "centralized"):
        # one client call per step: the step's graph and hidden states go node -> node down the chain
        nodes = [name for name in tracer.stats["route"] if name != "client"]
        assert len(nodes) == (3 if placement == "hybrid" else 1)
        assert tracer.stats["round_trips"] == GEN_TOKENS, tracer.stats
        assert set(tracer.stats["compute_s"]) == set(nodes)
        assert (tracer.stats["node_bytes"] > 0) == (placement == "hybrid")


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_generation_head_sees_one_position_per_step(placement, lm_for, hooks, refs):
    """As in transformers' generate (``logits_to_keep=1``) and so in nnsight: at every step, the prompt included,
    ``lm_head``'s input and output hold the last position only, while ``model.norm`` sees every position."""
    def by_hooks():
        seen: dict = {"in": [], "out": [], "norm": []}

        def head(module, args, output):  # a forward hook's return value would replace the output
            seen["in"].append(args[0].clone())
            seen["out"].append(output.clone())
        hooked_generate(hooks, 2, {"lm_head": head, "model.norm": lambda m, a, o: seen["norm"].append(o.clone())})
        return seen

    want = cached(refs, "head.hooks", by_hooks)
    lm = lm_for(placement)
    with lm.generate(GEN_PROMPTS, max_new_tokens=2, placement=placement) as tracer:
        got = {"in": hybrid.save([]), "out": hybrid.save([]), "norm": hybrid.save([])}
        for step in tracer.all():
            got["norm"].append(lm.model.norm.output)
            got["in"].append(lm.lm_head.input)
            got["out"].append(lm.lm_head.output)
    for key in ("in", "out", "norm"):
        assert len(got[key]) == len(want[key]) == 2
        for step, (value, ref) in enumerate(zip(got[key], want[key])):
            assert_close(value, ref, f"{placement} lm_head {key} step {step}")
    assert got["out"][0].shape == (len(GEN_PROMPTS), 1, hooks.model.config.vocab_size)
    assert got["norm"][0].shape[1] == 10       # the prompt's 10 tokens


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_generation_carries_a_value_across_steps(placement, lm_for, hooks, ns, refs):
    def by_hooks():
        seen: dict = {}
        tokens: list = []

        def read_first(module, args, output):
            seen.setdefault("first", output[:, -1].clone())

        def add(module, args, output):
            output[:, -1] += seen["first"] * 2

        hooked_generate(hooks, 3, {f"model.layers.{STEER_LAYER}": read_first, f"model.layers.{PATCH_LAYER}": add,
                                   "lm_head": lambda m, a, output: tokens.append(output[:, -1].argmax(-1))})
        return tokens

    want = cached(refs, "cross.hooks", by_hooks)
    theirs = cached(refs, "cross.nnsight", lambda: nnsight_run(ns, generate_cross_step))
    tokens, _ = generate_cross_step(lm_for(placement), placement=placement)
    assert len(tokens) == len(want) == len(theirs) == 3
    for step, (got, ref, nn) in enumerate(zip(tokens, want, theirs)):
        assert torch.equal(got, ref) and torch.equal(got, nn), f"{placement} step {step}: {got} {ref} {nn}"


@pytest.mark.parametrize("placement", PLACEMENTS)
def test_session_uses_a_value_from_an_earlier_trace(placement, lm_for, hooks, ns, refs):
    def by_hooks():
        seen: dict = {}
        hooks.run([CITIES[0]], {f"model.layers.{PATCH_LAYER}": lambda m, a, o: seen.__setitem__("h", o[:, -1].clone())})

        def patch_hook(module, args, output):
            output[:, -1] = seen["h"]
        return hooks.run([CITIES[2]], {f"model.layers.{PATCH_LAYER}": patch_hook})[:, -1].softmax(-1)

    want = cached(refs, "session.hooks", by_hooks)
    theirs = cached(refs, "session.nnsight", lambda: nnsight_run(ns, session_patch))
    clean = cached(refs, "session.clean", lambda: hooks.run([CITIES[2]])[:, -1].softmax(-1))
    probs, session = session_patch(lm_for(placement), placement=placement)
    assert isinstance(probs, torch.Tensor)
    assert_close(probs, want, f"{placement} vs hooks")
    assert_close(probs, theirs, f"{placement} vs nnsight")
    assert (probs - clean).abs().max() > 1e-3  # the patch changed the prediction
    first, second = (tracer.stats for tracer in session.traces)
    if placement in ("hybrid", "centralized"):
        # the shared value stayed on the node that computed it: it never crossed the client link
        assert session.kept == {(0, h_node_id(session))}
        assert first["client_bytes_received"] < D * 4, first
        assert second["client_bytes_sent"] < 20_000, second


def h_node_id(session) -> int:
    """The node id (in the first trace) of the value the second trace loads."""
    [proxy] = session.traces[1]._builder.imports.values()
    return proxy.node_id


def session_late_to_early(lm, **placement):
    """A late layer's state from the first trace written into an early layer of the second."""
    with lm.session() as session:
        with lm.trace(CITIES[0], **placement):
            h = lm.model.layers[24].output[:, -1]
        with lm.trace(CITIES[2], **placement):
            lm.model.layers[3].output[:, -1] = h
            probs = lm.lm_head.output[:, -1].softmax(-1).save()
    return probs, session


@pytest.mark.parametrize("placement", ["local", "hybrid"])
def test_session_value_from_a_later_layer_goes_through_the_client(placement, lm_for, hooks, ns, refs):
    def by_hooks():
        seen: dict = {}
        hooks.run([CITIES[0]], {"model.layers.24": lambda m, a, o: seen.__setitem__("h", o[:, -1].clone())})

        def patch_hook(module, args, output):
            output[:, -1] = seen["h"]
        return hooks.run([CITIES[2]], {"model.layers.3": patch_hook})[:, -1].softmax(-1)

    want = cached(refs, "session_late.hooks", by_hooks)
    theirs = cached(refs, "session_late.nnsight", lambda: nnsight_run(ns, session_late_to_early))
    probs, session = session_late_to_early(lm_for(placement), placement=placement)
    assert_close(probs, want, f"{placement} vs hooks")
    assert_close(probs, theirs, f"{placement} vs nnsight")
    assert session.kept == set()  # the node holding layer 24 runs after layer 3: the client relays the value
    if placement == "hybrid":
        first, second = (tracer.stats for tracer in session.traces)
        assert first["client_bytes_received"] > D * 4 and second["client_bytes_sent"] > D * 4


def test_session_value_needs_a_session(remote_lm):
    with remote_lm.trace(CITIES[0], placement="local"):
        h = remote_lm.model.layers[PATCH_LAYER].output[:, -1]
    with pytest.raises(hybrid.TraceError, match="another trace.*lm.session"):
        with remote_lm.trace(CITIES[2], placement="local"):
            remote_lm.model.layers[PATCH_LAYER].output[:, -1] = h
