"""SpanModel pieces equal the whole transformers model, and span hooks see (and may change) submodule calls."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from swarm.errors import BadRequestError, CapacityError, HookError, SequenceTooLongError
from swarm.sessions import SessionManager
from swarm.span_hook import HookContext, HookRegistry, active_hook, install_dispatch
from swarm.stages import Span, SpanModel


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint_factory):
    path = tiny_checkpoint_factory("llama", num_layers=4)
    return path, AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_chained_spans_equal_the_whole_model(tiny):
    path, ref = tiny
    first, second = SpanModel.load(path, Span(0, 1, embed=True)), SpanModel.load(path, Span(1, 4, head=True))
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        got = second(second(first(ids, embed=True), start=1, end=2), start=2, end=4, head=True)
        assert torch.equal(got, ref(ids).logits)


def test_span_loads_only_its_tensors(tiny):
    path, _ = tiny
    model = SpanModel.load(path, Span(1, 3))
    names = {n for n, _ in model.named_parameters()}
    assert names and all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in names)
    assert not hasattr(model.model, "embed_tokens") and not hasattr(model, "lm_head")


def test_bad_spans_are_refused(tiny):
    path, _ = tiny
    for span in (Span(0, 5), Span(1, 3, embed=True), Span(0, 2, head=True), Span(3, 2)):
        with pytest.raises(BadRequestError):
            SpanModel.load(path, span)


class Recorder:
    def __init__(self, scale_path=None):
        self.seen, self.scale_path = [], scale_path

    def before(self, path, args, kwargs):
        self.seen.append(("before", path))

    def after(self, path, output):
        self.seen.append(("after", path))
        return output * 0 if path == self.scale_path else output

    def result(self):
        return repr(self.seen).encode()


def test_hooks_run_only_for_the_active_request(tiny):
    path, ref = tiny
    model = SpanModel.load(path, Span(0, 4, embed=True, head=True))
    install_dispatch(model)
    ids = torch.randint(3, 128, (1, 5))
    with torch.no_grad():
        clean = model(ids, embed=True, head=True)
        recorder = Recorder(scale_path="model.layers.3.mlp")
        with active_hook(recorder):
            patched = model(ids, embed=True, head=True)
        again = model(ids, embed=True, head=True)
        # the same patch, done by hand with a PyTorch hook on the reference model
        handle = ref.model.layers[3].mlp.register_forward_hook(lambda m, a, o: o * 0)
        try:
            want = ref(ids).logits
        finally:
            handle.remove()
    assert torch.equal(clean, again) and not torch.equal(clean, patched)
    assert torch.equal(patched, want)
    assert ("before", "model.layers.2.self_attn") in recorder.seen and ("after", "lm_head") in recorder.seen


def test_hook_registry_rejects_unknown_kinds_and_wraps_hook_failures(tiny):
    path, _ = tiny
    registry = HookRegistry()
    context = HookContext(None, 0, 1, False, False, 0)
    with pytest.raises(HookError, match="no span hook 'x' v1"):
        registry.build("x", 1, b"", context)
    registry.register("x", 1, lambda payload, ctx: Recorder())
    assert isinstance(registry.build("x", 1, b"", context), Recorder)

    class Broken(Recorder):
        def after(self, path, output):
            raise IndexError("index 9 is out of bounds")

    model = SpanModel.load(path, Span(0, 1, embed=True))
    install_dispatch(model)
    with torch.no_grad(), active_hook(Broken()), pytest.raises(HookError, match="model.embed_tokens.*out of bounds"):
        model(torch.ones(1, 2, dtype=torch.long), embed=True)


def test_session_manager_charges_cache_bytes_as_used_and_caps_length():
    manager = SessionManager(max_cache_bytes=1000, bytes_per_token=10, max_length=50, max_client_bytes=600,
                             max_client_sessions=2)
    a = manager.open("a", start=0, end=1, embed=False, head=False, batch_size=1, max_length=50, client="x")
    assert manager.used_bytes == 0  # opening reserves nothing; steps are charged as they append tokens
    manager.charge(a, 50)  # 500 bytes
    with pytest.raises(CapacityError, match="needs 200 bytes, this client's sessions hold 500 of the 600.*"
                                            "--max-client-cache-bytes"):
        manager.charge(manager.open("a2", start=0, end=2, embed=False, head=False, batch_size=1, max_length=50,
                                    client="x"), 10)
    with pytest.raises(CapacityError, match="holds 2 open.*--max-client-sessions\) is 2"):
        manager.open("a3", start=0, end=1, embed=False, head=False, batch_size=1, max_length=50, client="x")
    b = manager.open("b", start=0, end=2, embed=False, head=False, batch_size=1, max_length=50, client="y")
    manager.charge(b, 25)  # 500 bytes: the cache is now full
    with pytest.raises(CapacityError, match="needs 20 bytes, 0 of 1000 are free.*--max-cache-bytes"):
        manager.charge(b, 1)
    with pytest.raises(SequenceTooLongError):
        manager.open("c", start=0, end=1, embed=False, head=False, batch_size=1, max_length=51, client="y")
    manager.close("a")
    manager.charge(b, 1)
    assert manager.used_bytes == 520 and manager.client_bytes("y") == 520
    b.length = 49
    with pytest.raises(SequenceTooLongError, match="max_length=50"):
        b.check_room(2)
    assert isinstance(b.cache, DynamicCache)
