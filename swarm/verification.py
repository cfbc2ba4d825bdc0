"""Spot checks (issue 13, requirement 3): recompute a random share of hops elsewhere and compare.

Forwards hop by hop (:func:`spot_check`), chained forwards (:func:`spot_check_chain`, hook results compared by the
hook's own ``agree``), hop-by-hop inference steps (:func:`spot_check_step`, history replayed statelessly) and chained
inference steps (:func:`check_chained_step`, the session's steps replayed on fresh sessions elsewhere).

With ``ClientConfig.verify = p``, each hop of :meth:`swarm.remote_sequence.RemoteSequence.forward` is checked with
probability ``p``, drawn from the OS's CSPRNG on the client (nothing the nodes see tells a check from a request).
A checked hop is recomputed with the same inputs and masks on other nodes serving those layers; outputs must agree
within :data:`TOLERANCE` of their dtype. On a disagreement a third opinion (a route avoiding both) settles it: the
outvoted single node is distrusted, and only an output two routes agree on is used. Where no other node serves the
layers the check is skipped (counted in ``RouteStats.verify_skipped``), as it is when the second route fails
(a dead or full node: the check is given up, the answer is not refused for it).

A check's calls are counted in ``RemoteSequence.verify_traffic``, not in ``traffic``, so a trace's client bytes and
round trips are those of the request itself whatever the draw.
"""

from __future__ import annotations

import operator
import random
from typing import Callable

import torch

from .errors import (BadRequestError, CapacityError, MissingBlocksError, OverloadedError, PeerUnreachableError,
                     ResultMismatchError)
from .handles import FORWARD
from .routing import Hop, plan_route
from .transport import call

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
"""Absolute and relative tolerance per output dtype (fp32: the golden tests' bound; half types: their rounding)."""

GIVE_UP = (PeerUnreachableError, CapacityError, BadRequestError)
"""Errors of a check's second route that give up the check (counted as skipped) rather than fail the request: a
dead, full or refusing checker says nothing about the checked node's answer (its next ordinary request finds out
about the checker). A third route's failure is raised: no unsettled answer is returned."""

_draw: random.Random = random.SystemRandom()
"""Which hops are checked: the OS CSPRNG, so nothing a node sees predicts a check. Tests that assert a detection
bound may swap in a seeded ``random.Random`` (:func:`seed_for_tests`); nothing else does."""


def seed_for_tests(seed: int | None) -> None:
    """Tests only: draw checks from ``random.Random(seed)`` (``None``: back to the CSPRNG)."""
    global _draw
    _draw = random.SystemRandom() if seed is None else random.Random(seed)


def agree(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and dtype, and equal within the dtype's tolerance (exact for integer outputs)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    tol = TOLERANCE.get(a.dtype, 1e-5)
    return torch.allclose(a.float(), b.float(), atol=tol, rtol=tol)


def should_check(fraction: float) -> bool:
    return fraction > 0 and _draw.random() < fraction


async def plan_avoiding(sequence, start: int, end: int, *, embed: bool, head: bool,
                        avoid: frozenset[str]) -> list[Hop]:
    """A route for ``[start, end)`` on the known records avoiding ``avoid`` and excluded peers (no DHT retries).

    Raises:
        MissingBlocksError: no such route.
    """
    records = await sequence.records()
    return plan_route(records, start, end, exclude=sequence.excluded() | avoid, model_name=sequence.model_name,
                      embed=embed, head=head, costs=sequence.costs())


async def recompute(sequence, hop: Hop, x: torch.Tensor, extras: dict, *, embed: bool, head: bool,
                    avoid: frozenset[str]) -> tuple[torch.Tensor, list[str]]:
    """Run ``hop``'s layers on a route avoiding ``avoid`` (and excluded peers); returns the output and its peers.

    Raises:
        MissingBlocksError: no such route.
    """
    route = await plan_avoiding(sequence, hop.start, hop.end, embed=embed, head=head, avoid=avoid)
    for i, sub in enumerate(route):
        try:
            out, _ = await call(sequence.p2p, sub.peer_id, FORWARD, {"inputs": x, **extras},
                                {"start": sub.start, "end": sub.end, "embed": embed and i == 0,
                                 "head": head and i == len(route) - 1},
                                timeout_s=sequence.config.request_timeout_s, **sequence._verify_options)
        except (PeerUnreachableError, CapacityError) as e:
            sequence.note_failure(sub.peer_id, e)  # dead: excluded, so a retry goes elsewhere; full: weighed
            raise
        x = out["outputs"]
    return x, [sub.peer_id for sub in route]


async def spot_check(sequence, hop: Hop, x: torch.Tensor, y: torch.Tensor, extras: dict, *, embed: bool,
                     head: bool) -> torch.Tensor:
    """Check ``y`` (``hop``'s answer to ``x``) against other nodes; return an output two routes agree on.

    Raises:
        ResultMismatchError: the answers disagree and no third route exists, or all three disagree.
    """
    output, _ = await _vote(sequence, hop, x, y, extras, embed=embed, head=head, last=None, what="")
    return output


async def spot_check_step(sequence, hop: Hop, history: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                          extras: dict, *, embed: bool, head: bool) -> tuple[torch.Tensor, bool]:
    """Check ``y``, an inference session hop's answer to step input ``x`` after ``history`` (the hop's earlier step
    inputs): the whole history and the step are recomputed in one stateless forward on another route (``extras``
    hold the mask and positions of every token so far) and its last positions compared. A KV-cached step and a
    full recomputation differ by float rounding only, within :data:`TOLERANCE`.

    Returns ``(output, outvoted)``: the output two routes agree on, and whether the session's node was outvoted (the
    caller then moves the hop off it).

    Raises:
        ResultMismatchError: the answers disagree and no third route exists, or all three disagree.
    """
    return await _vote(sequence, hop, torch.cat([*history, x], dim=1), y, extras, embed=embed, head=head,
                       last=x.shape[1], what="session step ")


async def _vote(sequence, hop: Hop, x: torch.Tensor, y: torch.Tensor, extras: dict, *, embed: bool, head: bool,
                last: int | None, what: str) -> tuple[torch.Tensor, bool]:
    """Recompute ``hop`` on ``x`` on a route avoiding its node (its ``last`` positions compared, all when None) and,
    on a disagreement with ``y``, on a third route avoiding both. Returns the output two routes agree on and
    whether ``hop``'s node was outvoted (it is then distrusted and reported).

    A second route that fails (dead, full, refusing) is retried once (a dead checker is excluded by then), then the
    check is given up, not the answer; so is a check no other route can make (counted in ``verify_skipped``).
    """
    stats = sequence.stats
    stats.verify_checks += 1

    async def elsewhere(avoid: frozenset[str]) -> tuple[torch.Tensor, list[str]]:
        out, peers = await recompute(sequence, hop, x, extras, embed=embed, head=head, avoid=avoid)
        return (out if last is None else out[:, -last:]), peers

    for attempt in range(2):
        try:
            second, second_peers = await elsewhere(frozenset({hop.peer_id}))
            break
        except MissingBlocksError:
            stats.verify_skipped += 1
            return y, False
        except GIVE_UP:
            if attempt == 1:
                stats.verify_skipped += 1
                return y, False
    if agree(y, second):
        return y, False
    stats.verify_mismatches += 1
    where = f"{what}layers {hop.start}:{hop.end}: {hop.peer_id} vs {', '.join(second_peers)}"
    try:
        third, _ = await elsewhere(frozenset({hop.peer_id, *second_peers}))
    except MissingBlocksError:
        raise ResultMismatchError(f"Nodes disagree on {where}, and no third node serves those layers to settle it; "
                                  "no result is returned. Retry when more nodes serve them.") from None
    why = f"its {what}output for layers {hop.start}:{hop.end} was outvoted by two other routes"
    if agree(third, second):
        await _outvoted(sequence, hop.peer_id, why)
        return second, True
    if agree(third, y):
        if len(second_peers) == 1:
            await _outvoted(sequence, second_peers[0], why)
        return y, False
    raise ResultMismatchError(f"Three routes disagree on {where}; no result is returned.")


def _differing(a: tuple, b: tuple) -> tuple[set[str], set[str], str]:
    """The peers only chained answer ``a``'s route has, those only ``b``'s has, and a phrase naming them."""
    only_a = {h.peer_id for h in a[2]} - {h.peer_id for h in b[2]}
    only_b = {h.peer_id for h in b[2]} - {h.peer_id for h in a[2]}
    return only_a, only_b, f"chained routes differing in {sorted(only_a)} vs {sorted(only_b)}"


def _answers_agree(a: tuple, b: tuple, same_result: Callable[[bytes, bytes], bool]) -> bool:
    """Two chained answers ``(outputs, hook_result, route, meta)`` agree: outputs within tolerance, and the hook's
    results by ``same_result`` (the hook's own comparison; byte for byte when it has none: the swarm cannot read
    them)."""
    return agree(a[0], b[0]) and same_result(a[1], b[1])


async def spot_check_chain(sequence, answer: tuple, run,
                           same_result: Callable[[bytes, bytes], bool] = operator.eq) -> tuple:
    """Check a chained forward's ``answer``: each hop is checked with probability ``verify`` by re-running the whole
    chain (same inputs, hook payload for the new route, carry) on a route avoiding that hop's node
    (``await run(avoid=...)``); a disagreement is settled by a third route avoiding the nodes the two routes do not
    share. Hook results are compared by ``same_result`` (:attr:`swarm.remote_sequence.HookRequest.agree`). Returns
    the answer two routes agree on.

    Raises:
        ResultMismatchError: a disagreement no third route could settle.
    """
    stats = sequence.stats
    for hop in list(answer[2]):
        if not should_check(sequence.config.verify):
            continue
        stats.verify_checks += 1
        try:
            second = await run(avoid=frozenset({hop.peer_id}))
        except (MissingBlocksError, *GIVE_UP):
            stats.verify_skipped += 1
            continue
        if _answers_agree(answer, second, same_result):
            continue
        stats.verify_mismatches += 1
        only_first, only_second, where = _differing(answer, second)
        try:
            third = await run(avoid=frozenset(only_first | only_second))
        except MissingBlocksError:
            raise ResultMismatchError(f"Nodes disagree ({where}) and no third route settles it; no result is "
                                      "returned. Retry when more nodes serve those layers.") from None
        if _answers_agree(third, second, same_result):
            outvoted, answer = only_first, second
        elif _answers_agree(third, answer, same_result):
            outvoted = only_second
        else:
            raise ResultMismatchError(f"Three chained routes disagree ({where}); no result is returned.")
        if len(outvoted) == 1:
            await _outvoted(sequence, next(iter(outvoted)), "its chained output was outvoted by two other routes")
    return answer


async def check_chained_step(session, outputs: torch.Tensor, result: bytes, *, last_only: bool, argmax: bool,
                             checkable: bool = True) -> tuple[torch.Tensor, bytes]:
    """Check a :class:`swarm.chained_session.ChainedSession`'s latest step (the last of its history, answered
    ``(outputs, result)``): each hop of its route is checked with probability ``verify`` by replaying every step of
    the session so far, one call per step as it was sent (inputs, masks, the step's hook payload planned for the new
    route, its carry), on sessions along a route avoiding that hop's node (kept between checks and caught up on
    the steps since, :func:`_replay`), and comparing the latest step's
    answer (outputs within :data:`TOLERANCE`, hook results by the hook's ``agree``). A replay rebuilds the KV caches
    and every per-step value exactly as the session built them, so any graph a session can run is reproduced, not
    approximated; a single stateless forward over the whole history would not do: the step's graph would see every
    position instead of the step's. ``checkable=False`` (the step reads values an earlier trace of an
    ``lm.session()`` left on the route's nodes, which another route does not hold) counts drawn checks as skipped.

    A disagreement is settled by a third route. If it outvotes the session's answer, the answer the two routes agree
    on is returned, the single node only the session's route had is distrusted and reported, and the session is
    rebuilt on a route without it (its history, this step included, replayed) — only if every earlier answer that
    node gave in this session was checked; otherwise its unchecked answers may have steered this generation (tokens,
    values), so ResultMismatchError is raised.

    Raises:
        ResultMismatchError: a disagreement no third route could settle, or the session's node was outvoted after
            unchecked steps (or no single node of its route can be blamed).
    """
    sequence, route = session.sequence, session.route
    stats, unchecked = sequence.stats, session.unchecked
    hook = session.history[-1].hook
    same = hook.agree if hook is not None and hook.agree else operator.eq
    answer = (outputs, result, route)
    for hop in route:
        if not should_check(sequence.config.verify):
            unchecked[hop.peer_id] = unchecked.get(hop.peer_id, 0) + 1
            continue
        stats.verify_checks += 1
        second = None if not checkable else await _replay_or_none(session, frozenset({hop.peer_id}), last_only,
                                                                   argmax)
        if second is None:
            stats.verify_skipped += 1
            unchecked[hop.peer_id] = unchecked.get(hop.peer_id, 0) + 1
            continue
        if _answers_agree(answer, second, same):
            continue
        stats.verify_mismatches += 1
        only_first, only_second, where = _differing(answer, second)
        where = f"a generation step, {where}"
        try:
            third = await _replay(session, frozenset(only_first | only_second), last_only, argmax)
        except MissingBlocksError:
            raise ResultMismatchError(f"Nodes disagree on {where} and no third route settles it; no result is "
                                      "returned. Retry when more nodes serve those layers.") from None
        if _answers_agree(third, answer, same):
            if len(only_second) == 1:
                await _outvoted(sequence, next(iter(only_second)),
                                "its generation step was outvoted by two other routes")
            continue
        if not _answers_agree(third, second, same):
            raise ResultMismatchError(f"Three chained routes disagree on {where}; no result is returned.")
        if len(only_first) != 1:
            raise ResultMismatchError(f"Two routes outvoted this session's answer on {where}, and no single node "
                                      "of its route can be blamed; no result is returned. Start the generation "
                                      "again.")
        caught = next(iter(only_first))
        await _outvoted(sequence, caught, "its generation step was outvoted by two other routes")
        if unchecked.get(caught, 0):
            raise ResultMismatchError(
                f"A spot check outvoted {caught} on a generation step after {unchecked[caught]} unchecked step(s) "
                "of this session, which may have steered it; no result is returned. Start the generation again: "
                "this client now routes around that node (verify=1.0 checks every step, so a caught node is "
                "replaced mid-session instead).")
        await session._rebuild(await sequence.route(session.start, session.end, embed=session.embed,
                                                    head=session.head))  # ``caught`` is excluded now
        return second[0], second[1]
    return outputs, result


async def _replay_or_none(session, avoid: frozenset[str], last_only: bool, argmax: bool) -> tuple | None:
    """A check's second opinion (:func:`_replay`), or None where it cannot be had (no route, or the checker failed:
    the check is given up, not the answer)."""
    for attempt in range(2):  # a failed checker is retried once (a dead one is excluded by then)
        try:
            return await _replay(session, avoid, last_only, argmax)
        except MissingBlocksError:
            return None
        except GIVE_UP:
            if attempt == 1:
                return None
    return None


async def _replay(session, avoid: frozenset[str], last_only: bool, argmax: bool) -> tuple:
    """The session's latest step as a route avoiding ``avoid`` answers it, after every earlier step (calls counted
    in ``verify_traffic``); returns ``(outputs, hook result, route)``.

    The checker session for ``avoid`` is kept (``session.checkers``) and only caught up on the steps it has not
    seen when drawn again, so the checks of one hop cost at most one replayed call per step of the generation in
    all, not the whole history at every check. A checker is dropped when it fails or when a node of its route has
    been excluded (a dead or outvoted checker).

    Raises:
        MissingBlocksError: no such route.
    """
    sequence, history = session.sequence, session.history
    checker = session.checkers.pop(avoid, None)
    if checker is not None and ({h.peer_id for h in checker.route} & sequence.excluded()
                                or len(checker.history) >= len(history)):
        await checker.close()
        checker = None
    if checker is None:
        hops = await plan_avoiding(sequence, session.start, session.end, embed=session.embed, head=session.head,
                                   avoid=avoid)
        checker = type(session)(sequence, hops, batch_size=session.batch_size, max_length=session.max_length,
                                embed=session.embed, head=session.head, start=session.start, end=session.end)
        checker.traffic = sequence.verify_traffic
    kept = False
    try:
        for past in history[len(checker.history):-1]:
            await checker._send(past, last_only=True)
            checker._history.append(past)
        outputs, result = await checker._send(history[-1], last_only=last_only, argmax=argmax)
        checker._history.append(history[-1])
        session.checkers[avoid], kept = checker, True
    except PeerUnreachableError:
        await sequence.ban_unreachable(checker.route)  # a dead checker is excluded, so the retry goes elsewhere
        raise
    except OverloadedError as e:
        if e.peer_id:
            sequence.mark_busy(e.peer_id)
        raise
    finally:
        if not kept:
            await checker.close()
    return outputs, result, checker.route


async def _outvoted(sequence, peer_id: str, why: str) -> None:
    """Distrust ``peer_id`` here and publish a signed suspect report others weigh (they do not exclude on it)."""
    sequence.stats.suspects.append(peer_id)
    sequence.distrust(peer_id, why)
    await sequence.report_suspect(peer_id, why)
