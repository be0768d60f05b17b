"""The reward service protocol (`kind: http`, `videorl reward serve`): no pickle, so a reply cannot run code.

POST <url>/score, body = one msgpack map (the header) followed by the raw frame bytes:
  header {"ids": [N] str, "prompts": [N] str, "shape": [N, T, H, W, 3], "extras": {name: value}}, frames uint8
  C-order; an extra field that is a numeric array travels as {"__array__": dtype, "shape": [...], "data": bytes},
  anything else as plain msgpack (lists, strings, numbers).
Replies (JSON): 200 {"scores": {dim: [N] float}, "version": str}; 400 {"error": str, "sample_id": str} for a bad
sample (a `DataError` on the server); 500 for anything else. A 4xx that names no sample of the batch (a wrong token,
a wrong route) and a reply with other dims than /info gave are infrastructure: the run's failure budget
(`max_consecutive_failures`) ends a run whose service stays that way, instead of dropping every group as bad data.
GET <url>/info -> {"model", "dims", "version", "batches"}.

The client sorts failures as the pools do: 5xx, timeouts and connection errors are infrastructure, retried here
`retries` times with back-off (1 s, 2 s, 4 s, ...), then raised as `RewardServiceError` for the pool to retry the
batch elsewhere; a 4xx naming a sample of the batch is a `DataError` naming it, a malformed reply one naming the
first sample.
"""

from __future__ import annotations

import os
import time
from urllib.parse import urlparse

import msgpack
import numpy as np

from rewards.errors import DataError

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 120.0  # a large reward model on a large batch; a hung server is retried after this
BACKOFF_S = 1.0


class RewardServiceError(ConnectionError):
    """The reward service did not answer (connection refused, timeout, 5xx) after the client's retries."""


def check_url(url: str | None) -> str:
    parsed = urlparse(str(url or ""))
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"url {url!r} is not an http(s) URL (e.g. http://127.0.0.1:8000)")
    return str(url).rstrip("/")


def read_token(token_env: str | None) -> str | None:
    """The bearer token from environment variable `token_env` (None: no token)."""
    if token_env is None:
        return None
    token = os.environ.get(token_env)
    if not token:
        raise ValueError(f"token_env: environment variable {token_env!r} is not set (it holds the bearer token)")
    return token


def _pack_value(value):
    if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
        a = np.ascontiguousarray(value)
        return {"__array__": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _unpack_value(value):
    if isinstance(value, dict) and "__array__" in value:
        dtype = np.dtype(value["__array__"])
        if dtype.kind not in "biuf":
            raise ValueError(f"array dtype {dtype} is not numeric")
        return np.frombuffer(value["data"], dtype=dtype).reshape(value["shape"])
    return value


def encode_batch(batch: dict) -> bytes:
    """A reward batch {"ids", "videos" uint8 [N, T, H, W, 3], "prompts", extras...} -> request body."""
    videos = np.ascontiguousarray(batch["videos"], dtype=np.uint8)
    extras = {k: _pack_value(v) for k, v in batch.items() if k not in ("ids", "videos", "prompts")}
    header = {"ids": [str(i) for i in batch["ids"]], "prompts": [str(p) for p in batch["prompts"]],
              "shape": list(videos.shape), "extras": extras}
    return msgpack.packb(header, use_bin_type=True) + videos.tobytes()


def decode_batch(body: bytes) -> dict:
    """Request body -> the batch; ValueError when it is not one (the server answers 400)."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=len(body) + 1)
    unpacker.feed(body)
    try:
        header = unpacker.unpack()
    except Exception as e:  # msgpack raises several types for garbage
        raise ValueError(f"body does not start with a msgpack header ({type(e).__name__})") from None
    if not isinstance(header, dict) or not {"ids", "prompts", "shape"} <= set(header):
        raise ValueError("header must be a map with ids, prompts and shape")
    shape = [int(x) for x in header["shape"]]
    frames = body[unpacker.tell():]
    if len(shape) != 5 or int(np.prod(shape)) != len(frames):
        raise ValueError(f"header shape {shape} needs {int(np.prod(shape)) if shape else 0} frame bytes, got {len(frames)}")
    extras = {k: _unpack_value(v) for k, v in (header.get("extras") or {}).items()}
    return {"ids": list(header["ids"]), "prompts": list(header["prompts"]),
            "videos": np.frombuffer(frames, np.uint8).reshape(shape), **extras}


class HttpScorer:
    """A scorer plug-in whose model runs behind a reward service (see the module docstring).

    dims and the first version come from GET /info (retried like a batch); `version` then follows every reply, so a
    service restarted with another model is seen at once.
    """

    def __init__(self, url: str, token_env: str | None = None, retries: int = 3):
        import requests

        self.url = check_url(url)
        self.retries = int(retries)
        self.session = requests.Session()
        token = read_token(token_env)
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        r = self._request("GET", "/info")
        if r.status_code in (401, 403):
            raise ValueError(f"reward service {self.url} refused the request ({r.status_code}): set token_env to the "
                             "variable holding its bearer token")
        try:
            info = r.json()
        except ValueError:
            info = None
        if r.status_code != 200 or not isinstance(info, dict) or not isinstance(info.get("dims"), list):
            raise ValueError(f"reward service {self.url}: GET /info answered {r.status_code} without dims: {r.text[:200]!r}")
        self.dims = tuple(info["dims"])
        self.version = str(info.get("version", ""))

    def _request(self, method: str, path: str, body: bytes | None = None):
        """One call with retries on infrastructure failures; the response of anything else (2xx, 4xx)."""
        import requests

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(BACKOFF_S * 2 ** (attempt - 1))
            try:
                r = self.session.request(method, self.url + path, data=body, timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
                                         headers={"Content-Type": "application/octet-stream"} if body else None)
            except requests.RequestException as e:
                last = f"{type(e).__name__}"
                continue
            if r.status_code >= 500:
                last = f"HTTP {r.status_code}: {r.text[:200]}"
                continue
            return r
        raise RewardServiceError(f"reward service {self.url} failed {self.retries + 1} times ({last})")

    def score(self, batch: dict) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["ids"]]
        r = self._request("POST", "/score", encode_batch(batch))
        try:
            reply = r.json()
        except ValueError:
            reply = None
        if 400 <= r.status_code < 500:
            sid = reply.get("sample_id") if isinstance(reply, dict) else None
            why = reply.get("error") if isinstance(reply, dict) else r.text[:200]
            if sid not in ids:  # a refused token, a wrong route, a full server: no sample is at fault
                raise RewardServiceError(f"{self.url} answered {r.status_code} naming no sample of the batch: {why}")
            raise DataError(sid, f"{self.url} answered {r.status_code}: {why}")
        if r.status_code != 200 or not isinstance(reply, dict) or not isinstance(reply.get("scores"), dict):
            raise DataError(ids[0], f"{self.url} sent a malformed reply (HTTP {r.status_code}): {r.text[:200]!r}")
        if set(reply["scores"]) != set(self.dims):  # the service now runs another model: not this batch's fault
            raise RewardServiceError(f"{self.url} now scores {sorted(reply['scores'])}, this run expects "
                                     f"{list(self.dims)} (restarted with another model?)")
        self.version = str(reply.get("version", self.version))
        return reply["scores"]  # RewardScorer checks dims, shapes and finiteness
