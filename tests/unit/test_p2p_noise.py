"""The daemon's "use of closed network connection" at a clean stop is not logged; its other errors are."""

from __future__ import annotations

import json
import logging

from hivemind.p2p.p2p_daemon import P2P

from swarm.p2p_noise import P2PD_LOGGER, quiet_p2pd_shutdown


def _daemon_line(msg: str, error: str) -> str:
    """A log line as go-libp2p-daemon writes it (GOLOG_LOG_FMT=json), which hivemind re-logs."""
    return json.dumps({"level": "error", "ts": "2026-11-26T20:19:57.532+0000", "logger": "p2pd",
                       "caller": "go-libp2p-daemon/daemon.go:198", "msg": msg, "error": error})


def test_only_the_closed_socket_message_is_dropped(caplog):
    quiet_p2pd_shutdown()
    quiet_p2pd_shutdown()  # idempotent
    assert len(logging.getLogger(P2PD_LOGGER).filters) >= 1
    with caplog.at_level(logging.ERROR, logger=P2PD_LOGGER):
        P2P._log_p2pd_message(_daemon_line("error accepting connection",
                                           "accept unix /tmp/hivemind-p2pd-UELLLYRKXMI.sock: use of closed network "
                                           "connection"))
        P2P._log_p2pd_message(_daemon_line("error accepting connection", "too many open files"))
    messages = [r.getMessage() for r in caplog.records if r.name == P2PD_LOGGER]
    assert messages == ["error accepting connection: too many open files"]
