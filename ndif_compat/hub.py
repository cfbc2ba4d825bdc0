"""The two Hugging Face Hub calls nnsight's client makes for a model, answered for the gateway's model.

``LanguageModel("<name>")`` reads the config and tokenizer from the Hub, and ``remote=True`` asks the Hub for the
model's canonical id. With ``HF_ENDPOINT`` pointing at the gateway, both are answered here: model info
(``GET /api/models/<name>``) and the checkpoint's small files (``HEAD``/``GET /<name>/resolve/<rev>/<file>``).
Weights are never served: the client builds the model on the meta device.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

SERVED_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")
"""Checkpoint files the gateway hands out (config, tokenizer, generation config, chat template)."""


class HubFiles:
    """The served model's metadata in the Hub's shape, under each of its names."""

    def __init__(self, checkpoint: Path, names: tuple[str, ...]):
        self.checkpoint, self.names = checkpoint, names
        self.files = sorted(p.name for p in checkpoint.iterdir() if p.is_file() and p.name.endswith(SERVED_SUFFIXES))
        self.bodies = {name: (checkpoint / name).read_bytes() for name in self.files}
        """The served files' bytes, read once (the checkpoint does not change while the gateway serves it)."""
        self.etags = {name: f'"{hashlib.sha1(body).hexdigest()}"' for name, body in self.bodies.items()}
        digest = hashlib.sha1()
        for name in self.files:
            digest.update(name.encode() + self.bodies[name])
        self.commit = digest.hexdigest()

    def _not_found(self, what: str, code: str) -> Response:
        return JSONResponse({"error": what}, status_code=404, headers={"X-Error-Code": code})

    async def model_info(self, request: Request) -> Response:
        repo = request.path_params["repo"].split("/revision/")[0]
        if repo not in self.names:
            return self._not_found(f"Repository {repo} not found on this gateway", "RepoNotFound")
        return JSONResponse({"id": repo, "modelId": repo, "sha": self.commit, "private": False,
                             "siblings": [{"rfilename": f} for f in self.files], "tags": ["swarm-gateway"]})

    async def resolve(self, request: Request) -> Response:
        repo, filename = request.path_params["repo"], request.path_params["filename"]
        if repo not in self.names:
            return self._not_found(f"Repository {repo} not found on this gateway", "RepoNotFound")
        headers = {"X-Repo-Commit": self.commit}
        if filename not in self.files:
            return Response(status_code=404, headers={**headers, "X-Error-Code": "EntryNotFound"})
        body = self.bodies[filename]
        headers |= {"ETag": self.etags[filename], "Content-Length": str(len(body))}
        if request.method == "HEAD":
            return Response(status_code=200, headers=headers)
        return Response(body, media_type="application/octet-stream", headers=headers)

    async def tree(self, request: Request) -> Response:
        return self._not_found("no such folder", "EntryNotFound")
