"""The p2p daemon's benign shutdown message, kept out of the logs.

When a process closes its DHT, hivemind stops the Go p2p daemon, whose accept loop on its control socket then fails
with ``error accepting connection: accept unix /tmp/hivemind-p2pd-….sock: use of closed network connection`` and logs
it at ERROR. It means only "the socket was closed, as asked"; printed on every clean stop, it reads as a failure to
volunteers and researchers. This filter drops exactly that message (any other daemon error is still logged).
"""

from __future__ import annotations

import logging

P2PD_LOGGER = "hivemind.p2p.p2p_daemon"
"""The logger hivemind re-logs the daemon's own log lines to."""


class ClosedSocketAtShutdown(logging.Filter):
    """Drops the daemon's "error accepting connection … use of closed network connection" record."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not ("error accepting connection" in message and "use of closed network connection" in message)


def quiet_p2pd_shutdown() -> None:
    """Install the filter on hivemind's daemon logger (once; inherited by the DHT's child process)."""
    logger = logging.getLogger(P2PD_LOGGER)
    if not any(isinstance(f, ClosedSocketAtShutdown) for f in logger.filters):
        logger.addFilter(ClosedSocketAtShutdown())
