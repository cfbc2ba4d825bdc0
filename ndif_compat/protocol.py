"""The wire side of nnsight 0.8's remote protocol: model keys, jobs and their status stream.

A job moves RECEIVED → QUEUED → RUNNING (→ LOG …) → COMPLETED | ERROR. Each status is a ``ResponseModel``
(nnsight's own schema): JSON text for status updates, and for COMPLETED over the websocket a binary frame
(``ResponseModel.pickle()``) whose ``data`` is the result blob itself; when the result is larger than the inline
limit, or the job is polled (``GET /response/{id}``), COMPLETED's ``data`` is the URL of ``GET /result/{id}``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from nnsight.schema.response import ResponseModel, Status

from .errors import BadRequestError, ModelNotServedError

DESCRIPTIONS = {
    Status.RECEIVED: "Your job has been received and is waiting to be queued.",
    Status.QUEUED: "Your job has been queued.",
    Status.RUNNING: "Your job has started running.",
    Status.COMPLETED: "Your job has been completed.",
}


def parse_model_key(model_key: str) -> str:
    """The repo id in ``"nnsight.modeling.language.LanguageModel:{"repo_id": ..., "revision": ...}"``.

    Raises:
        BadRequestError: not a transformers language-model key.
    """
    cls, _, suffix = model_key.partition(":")
    if not cls.startswith("nnsight.modeling.") or not suffix:
        raise BadRequestError(f"model key {model_key[:200]!r} is not an nnsight LanguageModel key.")
    try:
        data = json.loads(suffix)
    except json.JSONDecodeError:
        raise BadRequestError(f"model key suffix {suffix[:200]!r} is not JSON.") from None
    if not isinstance(data, dict) or not isinstance(data.get("repo_id"), str):
        raise BadRequestError("model key has no repo_id.")
    return data["repo_id"]


def check_model(model_key: str, names: tuple[str, ...]) -> str:
    """Raise :class:`ModelNotServedError` unless the key names a model served here; returns the repo id."""
    repo_id = parse_model_key(model_key)
    if repo_id not in names:
        raise ModelNotServedError(f"this gateway serves {', '.join(repr(n) for n in names)}; the request names "
                                  f"{repo_id!r}. Build the model as "
                                  f"TransformersModel({names[0]!r}, task='text-generation').")
    return repo_id


@dataclass
class Job:
    """One request and everything the client may still ask about it."""

    session_id: str
    blob: bytes
    compress: bool
    base_url: str
    """The gateway's address as the client reached it (the result URL is built on it, never on the bind host)."""
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    latest: ResponseModel | None = None
    result: bytes | None = None
    meta: dict = field(default_factory=dict)
    finished: float | None = None

    def response(self, status: Status, description: str | None = None, data: Any = None) -> ResponseModel:
        return ResponseModel(id=self.id, status=status, description=DESCRIPTIONS.get(status, "") if description is None
                             else description, data=data, meta=dict(self.meta) or None)


class Subscriptions:
    """Websocket sessions by id: status updates for a job go to its session's queue (if the client subscribed)."""

    def __init__(self):
        self._queues: dict[str, asyncio.Queue] = {}

    def open(self) -> tuple[str, asyncio.Queue]:
        session_id = uuid.uuid4().hex
        q = self._queues[session_id] = asyncio.Queue()
        return session_id, q

    def close(self, session_id: str) -> None:
        self._queues.pop(session_id, None)

    def push(self, session_id: str, message: str | bytes) -> None:
        q = self._queues.get(session_id)
        if q is not None:
            q.put_nowait(message)
