"""Who a request is from, for the node's per-client quotas (issue 10, req. 4: fair shares).

A node bounds, per client, the KV-cache bytes of its sessions, the sessions it holds open, the session-store bytes of
its values (``hybrid``) and its requests running or queued for compute. The client is named by
:func:`client_identity`:

- a direct call: the caller's peer id (``context.remote_id``, authenticated by libp2p: nobody can send as a peer id
  whose key they do not hold);
- a chained call (node → node): the previous node names the client it serves in ``meta['origin']``; the identity is
  ``f"{origin}<{caller}"``, and the node passes that identity on as the next hop's origin.

What a forged origin can and cannot do. The part after the last ``<`` is always the authenticated caller, so a
request can never be counted as another peer's *direct* calls, nor as calls relayed by a node that did not relay
them: a client cannot fill, or evict from, the quota of a victim who reached this node directly or through an honest
node. What it can do is claim new identities: any caller can put any string in ``origin`` and get a fresh quota on
this node, exactly as it could by minting new peer ids (peer ids are free: a key pair each). Quotas therefore bound
what *one identity* takes — the cheap one-client attack fails and other clients' values are evicted only by
themselves — while a stranger with many identities is bounded only by the node-wide limits (``--max-cache-bytes``,
``--max-queued-compute``, the store's size), which still hold. A client is also a different identity on a node it
calls directly and one it reaches through a chain; each has its own quota.
"""

from __future__ import annotations

from .errors import BadRequestError, OverloadedError

#: Longest ``meta['origin']`` accepted (a 64-hop chain of base58 peer ids fits).
MAX_ORIGIN_CHARS = 4096


def client_identity(remote_id: str, origin: object = None) -> str:
    """The identity a request counts against: ``remote_id`` for a direct call, ``f"{origin}<{remote_id}"`` for a call
    relayed by ``remote_id`` on behalf of ``origin`` (see the module docstring for what a forged origin can do).

    Raises:
        BadRequestError: ``origin`` is not a non-empty string of at most :data:`MAX_ORIGIN_CHARS` characters.
    """
    if origin is None:
        return remote_id
    if not isinstance(origin, str) or not 0 < len(origin) <= MAX_ORIGIN_CHARS:
        raise BadRequestError(f"meta['origin'] must be a non-empty string of at most {MAX_ORIGIN_CHARS} characters.")
    return f"{origin}<{remote_id}"


class ClientQueue:
    """Requests admitted for compute and not yet answered, per client, bounded by ``max_per_client``."""

    def __init__(self, max_per_client: int):
        self.max_per_client = max_per_client
        self._count: dict[str, int] = {}

    def count(self, client: str) -> int:
        return self._count.get(client, 0)

    def admit(self, client: str) -> None:
        """Count one more request of ``client``.

        Raises:
            OverloadedError: ``client`` already has ``max_per_client`` requests running or queued here.
        """
        mine = self.count(client)
        if mine >= self.max_per_client:
            raise OverloadedError(f"This client already has {mine} request(s) running or queued on this node, the "
                                  f"per-client limit (--max-client-queued-compute) is {self.max_per_client}; wait for "
                                  f"an answer before sending more, or use another replica of these layers.")
        self._count[client] = mine + 1

    def done(self, client: str) -> None:
        left = self._count.get(client, 0) - 1
        if left > 0:
            self._count[client] = left
        else:
            self._count.pop(client, None)
