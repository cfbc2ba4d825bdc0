"""Checks ``swarm-node serve`` runs before any heavy work (torch, weights, the DHT), each failing with one line that
says what is wrong and how to fix it.

The CLI turns :class:`StartupError` into ``error: <message>`` and exit status 2 (``--debug`` adds the traceback).
Only the standard library here: the checks must answer in milliseconds, before torch is imported.
"""

from __future__ import annotations

import errno
import ipaddress
import json
import math
import os
import socket
from pathlib import Path

from .errors import BadRequestError

PEER_EXAMPLE = "/ip4/203.0.113.5/tcp/31337/p2p/QmPeerID"
_PEER_HINT = ("copy it from the line 'Others can join with: --initial-peers ...' that the first node printed, "
              f"e.g. {PEER_EXAMPLE}")

_NO_VALUE = {"quic", "quic-v1", "ws", "wss", "tls", "noise", "http", "https", "p2p-circuit", "webtransport", "webrtc"}
"""Multiaddr protocols that take no value."""


class StartupError(BadRequestError):
    """A flag of ``swarm-node serve`` cannot work on this machine or in this swarm; the message says how to fix it."""

    code = "startup_error"


def check_port_free(host: str, port: int) -> None:
    """Bind ``host:port`` ourselves first: libp2p listens with SO_REUSEPORT, so a second node on a used port would
    start and share the port with the first (the kernel would split connections between two peers).

    Raises:
        StartupError: the port is taken, or ``host`` is not an address of this machine.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise StartupError(f"--port {port} is already in use on {host} (another node or program listens "
                                   "there): stop it, or pick another port (--port 0 takes any free one).") from e
            if e.errno == errno.EADDRNOTAVAIL:
                raise StartupError(f"--host {host} is not an address of this machine: listen on 0.0.0.0 (all) or a "
                                   "local address, and give the public one as --announce-host.") from e
            if e.errno == errno.EACCES:
                raise StartupError(f"--port {port} needs privileges on {host}: use a port above 1023.") from e
            raise StartupError(f"Cannot listen on {host}:{port}: {e.strerror}.") from e


def parse_peer(text: str) -> tuple[str | None, int | None]:
    """Check that ``text`` is a peer multiaddr with a peer id; return its TCP ``(host, port)`` if it has one.

    Raises:
        StartupError: not a multiaddr (``127.0.0.1:31337``), or one without ``/p2p/<peer id>``.
    """
    if not text.startswith("/"):
        raise StartupError(f"--initial-peers {text!r} is not a multiaddr (it must begin with /): {_PEER_HINT}.")
    parts = text[1:].split("/")
    pairs = []
    while parts:
        proto = parts.pop(0)
        if proto in _NO_VALUE:
            continue
        if not proto or not parts or not parts[0]:
            raise StartupError(f"--initial-peers {text!r} is malformed (/protocol/value/... expected): {_PEER_HINT}.")
        pairs.append((proto, parts.pop(0)))
    fields = dict(pairs)
    if "p2p" not in fields and "ipfs" not in fields:
        raise StartupError(f"--initial-peers {text!r} lacks the peer id (/p2p/Qm...): {_PEER_HINT}.")
    host = next((value for proto, value in pairs if proto in ("ip4", "ip6", "dns", "dns4", "dns6")), None)
    for proto in ("ip4", "ip6"):
        if proto in fields:
            try:
                ipaddress.ip_address(fields[proto])
            except ValueError:
                raise StartupError(f"--initial-peers {text!r}: {fields[proto]!r} is not an {proto} address.") from None
    port = None
    if "tcp" in fields:
        if not fields["tcp"].isdigit() or not 0 < int(fields["tcp"]) < 65536:
            raise StartupError(f"--initial-peers {text!r}: TCP port {fields['tcp']!r} is not in 1..65535.")
        port = int(fields["tcp"])
    return host, port


def check_initial_peers(peers: list[str], *, timeout_s: float = 3.0, alternative: str = "") -> None:
    """Every address well formed, and at least one of those with a TCP address accepting connections.
    ``alternative`` ends the message (", or ...").

    Raises:
        StartupError: a malformed address, or none of the TCP ones answers within ``timeout_s`` each.
    """
    addresses = [parse_peer(text) for text in peers]
    if any(host is None or port is None for host, port in addresses):
        return  # a transport we cannot probe here (QUIC, relays): let libp2p try it
    tried = []
    for host, port in addresses:
        try:
            with socket.create_connection((host, port), timeout=timeout_s):
                return
        except OSError as e:
            tried.append(f"{host}:{port} ({e.strerror or type(e).__name__})")
    if tried:
        raise StartupError(f"No --initial-peers answers: {', '.join(tried)}. Is that node still running? Check the "
                           f"address it printed (the port changes on every start without --port){alternative}.")


def looks_like_path(model: str) -> bool:
    """True if ``--model`` can only be a path (aliases have no slash and do not start with ``.`` or ``~``)."""
    return "/" in model or os.sep in model or model.startswith((".", "~"))


def check_model_dir(model: str, aliases: tuple[str, ...], families: tuple[str, ...] | None) -> None:
    """``--model`` is an alias or a checkpoint directory of a supported family (read from its config.json;
    ``families=None`` checks the directory only).

    Raises:
        StartupError: no such directory, no readable config.json, or an unsupported ``model_type``.
    """
    if model in aliases:
        return
    alias_hint = f"an alias ({', '.join(aliases)})" if aliases else "an alias such as smollm2-135m"
    path = Path(model).expanduser()
    if not path.is_dir():
        what = "a file" if path.exists() else "neither a known alias nor an existing directory"
        raise StartupError(f"--model {model!r} is {what}: pass {alias_hint} or a Hugging Face "
                           "checkpoint directory in safetensors (config.json + model.safetensors).")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise StartupError(f"--model {model!r} has no readable config.json ({e}): pass a directory written by "
                           "transformers' save_pretrained(..., safe_serialization=True).") from e
    family = config.get("model_type") if isinstance(config, dict) else None
    if families is not None and family not in families:
        raise StartupError(f"--model {model!r} is a {family!r} model; nodes serve the families "
                           f"{', '.join(families)} (GPT-2, OPT and others are not supported yet).")


def check_device(device: str) -> None:
    """``--device`` names a device torch can use here (imports torch: call it after the cheap checks).

    Raises:
        StartupError: an unknown device, or CUDA where torch has none.
    """
    import torch
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise StartupError(f"--device {device!r} is not a device: use cpu or cuda (cuda:1 for the second GPU).") from e
    if dev.type == "cpu":
        return
    if dev.type != "cuda":
        raise StartupError(f"--device {device!r} is not supported: use cpu or cuda.")
    if not torch.cuda.is_available():
        why = ("this torch was built without CUDA (install a CUDA build of torch)" if torch.version.cuda is None
               else "no CUDA GPU is visible (check nvidia-smi and CUDA_VISIBLE_DEVICES)")
        raise StartupError(f"--device {device}: {why}; or serve with --device cpu.")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise StartupError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible "
                           f"(cuda:0..cuda:{torch.cuda.device_count() - 1}).")


def check_mailbox(max_mailbox_bytes: int, max_client_mailbox_bytes: int, mailbox_hold_s: float) -> None:
    """The direct-answer mailbox (:mod:`swarm.direct_reply`) must be able to hold something, for a finite time."""
    for flag, value in (("--max-mailbox-bytes", max_mailbox_bytes),
                        ("--max-client-mailbox-bytes", max_client_mailbox_bytes)):
        if value < 1:
            raise StartupError(f"{flag} must be at least 1 (got {value}); a node whose mailbox holds nothing refuses "
                               "every direct answer (the defaults are 1073741824 in all, 268435456 per client).")
    if not (math.isfinite(mailbox_hold_s) and mailbox_hold_s > 0):
        raise StartupError(f"--mailbox-hold-s must be a positive number of seconds (got {mailbox_hold_s}); an answer "
                           "not collected within it is dropped (the default is 30).")
