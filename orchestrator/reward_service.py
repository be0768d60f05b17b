"""`videorl reward serve`: any configured reward model behind the reward service protocol (`rewards.reward_http`).

One process serves one scorer (run one per GPU, e.g. CUDA_VISIBLE_DEVICES=k on port 8000 + k); batches are scored
one at a time in a worker thread, so /info answers while a batch is scored. The failure taxonomy crosses the wire:
a `DataError` becomes 400 naming the sample, anything else 500 (the client retries it, then its pool does).
"""

from __future__ import annotations

import hmac
import threading

from fastapi import FastAPI, Request  # at module level: the handlers' annotations are resolved here
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from rewards.errors import DataError
from rewards.reward_http import decode_batch, read_token
from rewards.scorer import BATCH_KEYS, RewardScorer


def make_app(scorer: RewardScorer, model: str, token: str | None = None):
    """A FastAPI app: POST /score (msgpack header + raw uint8 frames), GET /info; with `token`, both answer 401
    unless the request carries `Authorization: Bearer <token>`."""
    app = FastAPI(title=f"videorl reward service: {model}")
    lock = threading.Lock()
    served = {"batches": 0}

    def score(body: bytes) -> JSONResponse:
        try:
            batch = decode_batch(body)
        except ValueError as e:
            return JSONResponse({"error": f"not a reward batch: {e}", "sample_id": None}, status_code=400)
        extras = {k: v for k, v in batch.items() if k not in BATCH_KEYS}
        try:
            with lock:  # one batch at a time on the model
                scores = scorer.score(batch["videos"], batch["prompts"], batch["ids"], **extras)
                served["batches"] += 1
        except DataError as e:
            return JSONResponse({"error": e.problem, "sample_id": e.sample_id}, status_code=400)
        except Exception as e:  # the machine's fault: the client retries
            return JSONResponse({"error": f"{type(e).__name__}: {e}"}, status_code=500)
        return JSONResponse({"scores": {d: scores[:, i].tolist() for i, d in enumerate(scorer.dims)},
                             "version": scorer.version})

    def refused(request: Request) -> JSONResponse | None:
        if token is not None and not hmac.compare_digest(request.headers.get("authorization", ""), f"Bearer {token}"):
            return JSONResponse({"error": "missing or wrong bearer token", "sample_id": None}, status_code=401)
        return None

    @app.post("/score")
    async def _score(request: Request):
        return refused(request) or await run_in_threadpool(score, await request.body())

    @app.get("/info")
    def _info(request: Request):
        return refused(request) or {"model": model, "dims": list(scorer.dims), "version": scorer.version, "batches": served["batches"]}

    return app


def serve(cfg, model: str, host: str = "127.0.0.1", port: int = 8000, token_env: str | None = None) -> None:
    """Load rewards.models.<model> of `cfg` (a learned one trained and cached as `videorl train` would) and serve it
    until interrupted; with `token_env`, only to requests carrying the bearer token that variable holds."""
    import uvicorn

    from policy.backend import video_shape

    if model not in cfg.rewards.models:
        raise ValueError(f"--model {model!r} is not in rewards.models; this config has {sorted(cfg.rewards.models)}")
    spec = cfg.rewards.models[model]
    checkpoint = spec.checkpoint
    if checkpoint is None and spec.kind in ("videoreward", "feedback"):
        from orchestrator.cli import _reward_checkpoints

        checkpoint = _reward_checkpoints(cfg, [model])[model]
    scorer = RewardScorer(spec.kind, checkpoint, (*video_shape(cfg.model), 3), **spec.scorer_options())
    print(f"serving reward model {model} ({spec.kind}, dims {list(scorer.dims)}, version {scorer.version}) "
          f"on http://{host}:{port}", flush=True)
    token = read_token(token_env)
    uvicorn.run(make_app(scorer, model, token), host=host, port=port, log_level="warning")
