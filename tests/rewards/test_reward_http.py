"""The reward service protocol end to end: `videorl reward serve` in a subprocess on 127.0.0.1, the `http` kind
as client. Real HTTP, real server; each failure sorted as the pools sort it."""

import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from rewards import world
from rewards.errors import DataError
from rewards.reward_http import RewardServiceError, decode_batch, encode_batch
from rewards.scorer import RewardScorer

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # starts servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, *args: str, env: dict | None = None) -> subprocess.Popen:
    """`videorl reward serve ... --port P` in its own session; returns once GET /info answers."""
    proc = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "reward", "serve", "--port", str(port), *args],
                            cwd=ROOT, env={**os.environ, **(env or {})}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"reward serve exited {proc.returncode}: {proc.stdout.read()[-2000:]}")
        try:
            r = requests.get(f"http://127.0.0.1:{port}/info", timeout=1)
            if r.status_code in (200, 401):
                return proc
        except requests.RequestException:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("reward serve did not answer within 180 s")


def stop_server(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


FLAKY = '''
import numpy as np
from rewards.errors import DataError

class Flaky:
    """Scores 1.0, raises a device fault for ids starting with "flaky", a data error for ids starting with "bad"."""
    dims = ("one",)
    version = "flaky-7"

    def score(self, batch):
        for sid in batch["ids"]:
            if sid.startswith("flaky"):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            if sid.startswith("bad"):
                raise DataError(sid, "this clip is refused")
        return {"one": np.ones(len(batch["ids"])) + np.asarray(batch.get("beat", 0)).sum(-1)}
'''


@pytest.fixture(scope="module")
def oracle_server():
    port = free_port()
    proc = start_server(port, "--model", "oracle", "rewards.models={oracle: {kind: oracle}}")
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


@pytest.fixture(scope="module")
def flaky_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("flaky")
    (root / "flaky_scorer.py").write_text(textwrap.dedent(FLAKY))
    port = free_port()
    proc = start_server(port, "--model", "flaky", "--token-env", "VIDEORL_TEST_TOKEN",
                        f"rewards.models={{flaky: {{kind: python, callable: 'flaky_scorer:Flaky', pythonpath: [{root}]}}}}",
                        env={"VIDEORL_TEST_TOKEN": "s3cret"})
    yield f"http://127.0.0.1:{port}"
    stop_server(proc)


def _batch(n=6, seed=0):
    videos, prompts = world.sft_dataset(n, seed=seed)
    return world.to_uint8(videos), [p.text for p in prompts], [f"s{i}" for i in range(n)]


def test_the_wire_format_round_trips_without_pickle():
    videos, prompts, ids = _batch(3)
    beat = np.linspace(0, 1, 24, dtype=np.float32).reshape(3, 8)
    body = encode_batch({"ids": ids, "videos": videos, "prompts": prompts, "beat": beat, "note": ["x", "y", "z"]})
    assert len(body) > videos.nbytes and body.endswith(videos.tobytes())  # raw frames after the msgpack header
    back = decode_batch(body)
    np.testing.assert_array_equal(back["videos"], videos)
    np.testing.assert_array_equal(back["beat"], beat)
    assert (back["ids"], back["prompts"], back["note"]) == (ids, prompts, ["x", "y", "z"])
    with pytest.raises(ValueError, match="frame bytes"):
        decode_batch(body[:-1])


def test_the_http_kind_scores_what_the_served_model_scores(oracle_server):
    videos, prompts, ids = _batch()
    remote = RewardScorer("http", url=oracle_server)
    assert remote.dims == ("vq", "mq", "ta") and remote.version == "oracle"
    np.testing.assert_array_equal(remote.score(videos, prompts, ids), RewardScorer("oracle").score(videos, prompts, ids))
    # a sample the server rejects (400) is a data error naming that sample
    prompts[4] = "a red hexagon moving left slowly"
    with pytest.raises(DataError, match=r"answered 400: bad prompt.*hexagon") as err:
        remote.score(videos, prompts, ids)
    assert err.value.sample_id == "s4"
    served = requests.get(f"{oracle_server}/info", timeout=5).json()
    assert served["batches"] >= 1 and served["dims"] == ["vq", "mq", "ta"]


def test_5xx_is_retried_then_an_infrastructure_error_and_tokens_are_checked(flaky_server, monkeypatch):
    videos, prompts, ids = _batch(2)
    with pytest.raises(ValueError, match="refused the request \\(401\\)"):
        RewardScorer("http", url=flaky_server)  # no token
    monkeypatch.setenv("MY_TOKEN", "s3cret")
    remote = RewardScorer("http", url=flaky_server, token_env="MY_TOKEN", retries=2)
    assert remote.version == "flaky-7"
    beat = np.ones((2, 8), np.float32)
    np.testing.assert_array_equal(remote.score(videos, prompts, ids, beat=beat)[:, 0], [9.0, 9.0])  # extras travel
    with pytest.raises(DataError, match="this clip is refused") as err:
        remote.score(videos, prompts, ["s0", "bad-1"])
    assert err.value.sample_id == "bad-1"
    before = requests.get(f"{flaky_server}/info", headers={"Authorization": "Bearer s3cret"}, timeout=5).json()["batches"]
    with pytest.raises(RewardServiceError, match=rf"{flaky_server} failed 3 times \(HTTP 500: .*CUDA error"):
        remote.score(videos, prompts, ["flaky-0", "s1"])  # retries=2: three tries, then the pool's to retry
    after = requests.get(f"{flaky_server}/info", headers={"Authorization": "Bearer s3cret"}, timeout=5).json()["batches"]
    assert after == before  # nothing was scored by the failed tries
    remote.plugin.session.headers["Authorization"] = "Bearer rotated"  # a token that stops working mid-run
    with pytest.raises(RewardServiceError, match=r"answered 401 naming no sample of the batch"):
        remote.score(videos, prompts, ids)
    monkeypatch.delenv("MY_TOKEN")
    with pytest.raises(ValueError, match="environment variable 'MY_TOKEN' is not set"):
        RewardScorer("http", url=flaky_server, token_env="MY_TOKEN")


def test_an_unreachable_service_fails_after_its_retries_naming_the_url_and_urls_must_be_http():
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(RewardServiceError, match=rf"reward service {url} failed 2 times \(ConnectionError\)"):
        RewardScorer("http", url=url, retries=1)
    for bad in ("ftp://example.com/score", "127.0.0.1:8000", "http://"):
        with pytest.raises(ValueError, match="is not an http\\(s\\) URL"):
            RewardScorer("http", url=bad)
