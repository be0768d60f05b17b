"""policy.doctor: every consistency check passes on a sound configuration and fails, with its number, on a broken one."""

import subprocess
import sys
from pathlib import Path

import pytest

from policy.backend import cpu_supports_bfloat16
from policy.doctor import run_checks
from policy.model import ModelConfig
from policy.wan.config import LoraConfig, WanConfig
from policy.wan.init import write_random_model

from .helpers import SDE_ROLLOUTS, VOCAB

SAMPLING = dict(mode="causal", sampler="sage", eta=0.7, steps=3, shift=1.0, group_size=2, clip_range=1e-3)
ROOT = Path(__file__).resolve().parents[2]


def by_name(checks):
    return {c.name.split(" (")[0].split(",")[0]: c for c in checks}


def test_videodit_passes_every_check_and_bf16_rollouts_fail_the_ratio():
    cfg = ModelConfig(vocab=VOCAB, dim=32, depth=2, heads=2, window=6, sink=2)
    checks = run_checks(cfg, None, trained=False, **SAMPLING)
    assert len(checks) == 7 and all(c.passed for c in checks), [c.row() for c in checks if not c.passed]
    named = by_name(checks)
    assert 0 <= named["on-policy importance ratio"].value < 1e-5  # float noise only (0 where the CPU rounds alike)
    assert "evicts" in named["cached streaming vs teacher forcing"].note
    if not cpu_supports_bfloat16():  # bfloat16 is refused on this CPU before any check runs, with the reason
        with pytest.raises(ValueError, match="=bfloat16 needs a CPU with native bfloat16"):
            run_checks(cfg, None, trained=False, rollout_dtype="bfloat16", **SAMPLING)
        return
    broken = by_name(run_checks(cfg, None, trained=False, rollout_dtype="bfloat16", **SAMPLING))
    ratio = broken["importance ratio"]
    assert not ratio.passed and ratio.value > ratio.tolerance and "bfloat16" in ratio.name
    assert broken["on-policy importance ratio"].passed  # the learner's own path stays consistent


def test_a_lora_wan_passes_every_check(tmp_path):
    write_random_model(tmp_path / "wan", "shapes", seed=1)
    cfg = WanConfig(kind="wan_causal", path=str(tmp_path / "wan"), frames=8, height=16, width=16, chunk=2, window=6,
                    sink=2, text_len=8, lora=LoraConfig(rank=4, alpha=8))
    checks = by_name(run_checks(cfg, None, **SAMPLING))
    assert all(c.passed for c in checks.values()), [c.row() for c in checks.values() if not c.passed]
    assert checks["disabled adapter == base"].note == "reference = adapters off"
    assert checks["adapter export -> fresh import"].note == "LoRA adapter tensors"
    bidirectional = by_name(run_checks(cfg.model_copy(update={"kind": "wan", "chunk": None, "window": None, "sink": 0}),
                                       None, **{**SAMPLING, "mode": "bidirectional"}))
    assert bidirectional["cached streaming vs teacher forcing"].note.startswith("not applicable")


@pytest.mark.slow
def test_the_cli_prints_a_table_writes_json_and_exits_1_on_a_failure(tmp_path):
    args = [sys.executable, "-m", "orchestrator.cli", "doctor", "--out", str(tmp_path), "model.dim=32", "model.depth=2",
            "rollout.steps=3", "rollout.group_size=2", *SDE_ROLLOUTS,  # PPO's view: an SDE
            f"cache_dir={tmp_path / 'cache'}"]
    ok = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "every check passed" in ok.stdout and (tmp_path / "doctor.json").is_file()
    bad = subprocess.run([*args, "rollout.dtype=bfloat16"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    if not cpu_supports_bfloat16():  # refused up front on this CPU: one line naming the key, exit 2
        assert bad.returncode == 2 and "=bfloat16 needs a CPU with native bfloat16" in bad.stderr
        return
    assert bad.returncode == 1
    line = next(row for row in bad.stdout.splitlines() if row.startswith("importance ratio, rollout bfloat16"))
    assert "FAIL" in line and float(line.split()[7]) > float(line.split()[8])  # value > tolerance, printed
