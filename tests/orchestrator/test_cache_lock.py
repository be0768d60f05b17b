"""Two processes asking for the same cache entry at once (two runs or sweeps sharing a cache): one builds it, the
other waits for it and reuses it."""

import json
import os
import subprocess
import sys
from pathlib import Path

from orchestrator.pretraining import DONE

REPO = Path(__file__).resolve().parents[2]

CHILD = """
import json, sys, time
from pathlib import Path
import orchestrator.pretraining as pretraining
from orchestrator.config import load_config

built = []
train = pretraining.train_base_model
pretraining.train_base_model = lambda *a, **k: built.append(1) or train(*a, **k)  # the real build, counted
cfg = load_config(None, ["model.dim=32", "model.depth=2", "data.sft_clips=256", "pretrain.steps=60",
                         "pretrain.batch_size=8", f"cache_dir={sys.argv[1]}/cache"])
ready = Path(sys.argv[1]) / "ready"
ready.mkdir(exist_ok=True)
(ready / sys.argv[2]).touch()
while len(list(ready.iterdir())) < 2:  # both ask at the same moment, imports done
    time.sleep(0.01)
path = pretraining.ensure_base_model(cfg, progress=False)
print(json.dumps({"path": str(path), "built": len(built)}))
"""


def test_two_processes_asking_for_one_base_model_build_it_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path), str(i)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for i in range(2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results[0]["path"] == results[1]["path"]
    assert sorted(r["built"] for r in results) == [0, 1]  # one built it, the other waited and reused it
    base = Path(results[0]["path"])
    assert (base / DONE).is_file()
    assert sorted(p.name for p in base.parent.iterdir()) == [f".{base.name}.lock", base.name]  # no half-built leftover
