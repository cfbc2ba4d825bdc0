"""``swarm-node``'s command line: help without heavy imports, help text, and the startup checks (issue 15)."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from swarm.cli import build_parser, dataclass_fields, main
from swarm.local_swarm import REPO
from swarm.span_hook import HookBudgets
from swarm.span_server import ServerLimits
from swarm.startup_checks import StartupError, check_device, check_model_dir, parse_peer

HEAVY = ("torch", "transformers", "hivemind", "nnsight", "trio", "matplotlib")

HELP_PROBE = textwrap.dedent("""
    import contextlib, importlib, io, json, sys
    HEAVY = {heavy!r}
    report = {{}}
    for module, argvs in {commands!r}:
        main = importlib.import_module(module).main
        for argv in argvs:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                try:
                    main(argv)
                except SystemExit:
                    pass
            loaded = sorted(m for m in HEAVY if m in sys.modules)
            report[" ".join([module] + argv)] = dict(help=out.getvalue(), heavy=loaded)
    print(json.dumps(report))
""")


def help_report(commands: list[tuple[str, list[list[str]]]]) -> dict:
    """Run each entry point's ``main(argv)`` in order in one fresh interpreter; per command: its output and the heavy
    packages imported so far (cumulative, so the first command that imports one is the culprit)."""
    code = HELP_PROBE.format(heavy=HEAVY, commands=commands)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_swarm_node_help_imports_nothing_heavy_and_shows_defaults():
    report = help_report([("swarm.cli", [["--help"], ["serve", "--help"], ["status", "--help"],
                                         ["prepare-model", "--help"]])])
    for command, result in report.items():
        assert result["heavy"] == [], f"{command} imported {result['heavy']}"
        assert "usage:" in result["help"]
        assert "``" not in result["help"] and ":class:" not in result["help"] and "None" not in result["help"], command
    serve = " ".join(report["swarm.cli serve --help"]["help"].split())
    assert "(default: smollm2-135m)" in serve and "{float32,bfloat16,float16}" in serve
    assert "Default: 268435456." in serve  # --max-request-bytes
    assert "--serve PORT" in report["swarm.cli status --help"]["help"]


@pytest.mark.parametrize("cls, module", [(ServerLimits, "swarm.span_server"), (HookBudgets, "swarm.span_hook")])
def test_limit_flags_read_from_source_equal_the_dataclass(cls, module):
    """The CLI reads the limits from source (so --help imports no torch); they must be the dataclass's fields."""
    read = [(name, default) for name, _, default, _ in dataclass_fields(module, cls.__name__)]
    assert read == [(f.name, f.default) for f in dataclasses.fields(cls)]
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    actions = {a.dest: a for a in serve._actions}
    for f in dataclasses.fields(cls):
        assert type(actions[f.name].type(str(f.default))) is type(f.default)


@pytest.mark.parametrize("text, fix", [
    ("127.0.0.1:32905", "must begin with /"),
    ("/ip4/127.0.0.1/tcp/31337", "lacks the peer id"),
    ("/ip4/127.0.0.1/tcp", "malformed"),
    ("/ip4/300.1.1.1/tcp/1/p2p/QmX", "not an ip4 address"),
    ("/ip4/127.0.0.1/tcp/99999/p2p/QmX", "not in 1..65535"),
])
def test_malformed_peer_addresses_are_refused_with_the_fix(text, fix):
    with pytest.raises(StartupError, match=fix) as info:
        parse_peer(text)
    assert "Others can join with" in str(info.value) or fix != "must begin with /"


def test_well_formed_peer_addresses_parse():
    assert parse_peer("/ip4/10.0.0.2/tcp/31337/p2p/QmPeer") == ("10.0.0.2", 31337)
    assert parse_peer("/dns4/node.example.org/tcp/443/p2p/QmPeer") == ("node.example.org", 443)
    assert parse_peer("/ip4/10.0.0.2/udp/31337/quic/p2p/QmPeer") == ("10.0.0.2", None)


def test_model_directories_are_checked_before_loading(tmp_path):
    families = ("llama", "qwen2")
    with pytest.raises(StartupError, match="neither a known alias nor an existing directory"):
        check_model_dir(str(tmp_path / "bad"), ("smollm2-135m",), families)
    (tmp_path / "file").write_text("x")
    with pytest.raises(StartupError, match="is a file"):
        check_model_dir(str(tmp_path / "file"), (), families)
    with pytest.raises(StartupError, match="no readable config.json"):
        check_model_dir(str(tmp_path), (), families)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(StartupError, match="'gpt2' model; nodes serve the families llama, qwen2"):
        check_model_dir(str(tmp_path), (), families)
    check_model_dir(str(tmp_path), (), None)  # the directory alone is fine
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    check_model_dir(str(tmp_path), (), families)
    check_model_dir("smollm2-135m", ("smollm2-135m",), families)


def test_devices_are_checked_against_this_torch():
    check_device("cpu")
    with pytest.raises(StartupError, match="not a device"):
        check_device("gpu")
    with pytest.raises(StartupError, match="not supported"):
        check_device("meta")
    if not torch.cuda.is_available():
        with pytest.raises(StartupError, match="--device cpu"):
            check_device("cuda")
    with pytest.raises(StartupError):
        check_device(f"cuda:{torch.cuda.device_count() + 3}")


@pytest.fixture
def own_signal_handlers():
    """``main(["serve", ...])`` installs the node's SIGINT/SIGTERM handlers; give pytest its own back."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)


def test_an_unsupported_family_exits_2_with_one_line_and_debug_shows_the_traceback(tmp_path, capsys,
                                                                                   own_signal_handlers):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    argv = ["serve", "--model", str(tmp_path), "--new-swarm", "--host", "127.0.0.1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --model") and "'gpt2'" in err and "Traceback" not in err
    assert main(["--debug"] + argv) == 2
    assert "Traceback" in capsys.readouterr().err


def test_a_device_without_cuda_exits_2(tmp_path, capsys, own_signal_handlers, tiny_checkpoint_factory):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: --device cuda is valid here (the cuda:N case is tested above)")
    path = tiny_checkpoint_factory("llama", num_layers=2)
    capsys.readouterr()  # the checkpoint's progress bar
    assert main(["serve", "--model", str(path), "--new-swarm", "--host", "127.0.0.1", "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --device cuda:") and "--device cpu" in err and len(err.splitlines()) == 1


def test_bench_and_gateway_help_import_nothing_heavy_and_list_the_choices():
    from bench.schema import WORKLOADS
    report = help_report([("plots.cli", [["--help"], ["plot", "--help"], ["run", "--help"]]),
                          ("ndif_compat.cli", [["--help"], ["serve", "--help"]])])
    for command, result in report.items():
        assert result["heavy"] == [], f"{command} imported {result['heavy']}"
        assert "usage:" in result["help"], command
    run = report["plots.cli run --help"]["help"]
    assert all(workload in run for workload in WORKLOADS)


def test_gateway_names_its_own_flag_for_a_bad_model(tmp_path, capsys):
    from ndif_compat.cli import main as gateway_main
    assert gateway_main(["serve", "--local", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("swarm-gateway: --local ") and "--model" not in err and "Traceback" not in err
