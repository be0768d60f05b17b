"""Checkpoints: exact round trips, corruption named by file with fallback, atomicity, pruning,
exact optimizer and RNG resumption. All on real files in tmp_path."""

import hashlib
import json
import logging
import math
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestrator.checkpoint import (
    CorruptCheckpoint,
    check_compatible,
    latest_checkpoint,
    load_checkpoint,
    optimizer_state_from_tensors,
    optimizer_state_to_tensors,
    restore_rng,
    rng_state,
    save_checkpoint,
)

ROOT = Path(__file__).resolve().parents[2]


def weights(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"policy": {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)},
            "reference": {"w": torch.full((6, 5), float(step))}}


def save_steps(run, steps, keep=10):
    for s in steps:
        save_checkpoint(run, s, weights(s), {"step": s, "cursor": 10 * s}, keep=keep)


def step_names(run):
    return sorted(p.name for p in (run / "checkpoints").iterdir())


def test_round_trip_is_exact(tmp_path):
    tensors = {
        "policy": {"w": torch.randn(3, 4), "half": torch.randn(5).to(torch.bfloat16), "scalar": torch.tensor(2.5),
                   "empty": torch.zeros(0, 3), "ids": torch.arange(7, dtype=torch.int64) * (2**40),
                   "mask": torch.tensor([True, False, True]), "strided": torch.arange(12.0).reshape(3, 4).t()},
        "optimizer": {"state.0.exp_avg": torch.tensor([1e-30, -3.0, float("inf")], dtype=torch.float64)},
    }
    state = {"controller": {"lambda": [0.4, 0.25], "integral": 0.1, "history": [0.0, 1e-300, -2.5e10]},
             "cursor": 123, "ledger": {"produced": ["g1", "g2"], "dropped": {"g3": "stale"}},
             "by_id": {3: "int keys survive", -1: None}, "flag": True, "blob": b"\x00\xff raw",
             "pair": (1, 2), "big": 2**63 + 5, "neg": -(2**63), "nan": float("nan")}
    path = save_checkpoint(tmp_path, 123, tensors, state)
    assert path == tmp_path / "checkpoints" / "step-000123"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "optimizer.safetensors",
                                                      "policy.safetensors", "state.msgpack"]
    ck = load_checkpoint(path)
    assert ck.step == 123 and ck.path == path and ck.skipped == []
    assert set(ck.tensors) == {"policy", "optimizer"}
    for group, named in tensors.items():
        assert set(ck.tensors[group]) == set(named)
        for name, t in named.items():
            got = ck.tensors[group][name]
            assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), (group, name)
    got_state = dict(ck.state)
    assert math.isnan(got_state.pop("nan"))
    expected = {k: v for k, v in state.items() if k != "nan"}
    expected["pair"] = [1, 2]  # msgpack has no tuple: it comes back as a list
    assert got_state == expected
    assert ck.state["controller"]["history"][1] == 1e-300  # floats are stored as float64, bit for bit


def test_manifest_lists_sizes_and_hashes(tmp_path):
    path = save_checkpoint(tmp_path, 7, weights(7), {"a": 1})
    m = json.loads((path / "manifest.json").read_text())
    assert m["format"] == "videorl-checkpoint" and m["version"] == 1 and m["step"] == 7
    assert sorted(m["files"]) == ["policy.safetensors", "reference.safetensors", "state.msgpack"]
    for name, info in m["files"].items():
        data = (path / name).read_bytes()
        assert info == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def truncate(path: Path):
    path.write_bytes(path.read_bytes()[:-1])


def flip(path: Path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncate": (lambda d: truncate(d / "policy.safetensors"),
                 r"step-000002/policy\.safetensors: \d+ bytes but manifest\.json says \d+ \(truncated"),
    "flip": (lambda d: flip(d / "policy.safetensors"),
             r"step-000002/policy\.safetensors: sha256 [0-9a-f]+\.\.\. differs from manifest\.json"),
    "delete_state": (lambda d: (d / "state.msgpack").unlink(),
                     r"step-000002/state\.msgpack: missing \(listed in manifest\.json\)"),
    "garbage_manifest": (lambda d: (d / "manifest.json").write_bytes(b"{\"format\": \x93garbage"),
                         r"step-000002/manifest\.json: not valid JSON"),
    "no_manifest": (lambda d: (d / "manifest.json").unlink(),
                    r"step-000002/manifest\.json: missing \(the checkpoint was never completed\)"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_corruption_is_named_and_latest_falls_back(tmp_path, caplog, kind):
    save_steps(tmp_path, [1, 2])
    corrupt, pattern = CORRUPTIONS[kind]
    bad = tmp_path / "checkpoints" / "step-000002"
    corrupt(bad)
    with pytest.raises(CorruptCheckpoint, match=pattern):
        load_checkpoint(bad)
    with caplog.at_level(logging.WARNING, logger="orchestrator.checkpoint"):
        ck = latest_checkpoint(tmp_path)
    assert ck.step == 1 and ck.state == {"step": 1, "cursor": 10}
    assert torch.equal(ck.tensors["policy"]["w"], weights(1)["policy"]["w"])
    assert [p for p, _ in ck.skipped] == [bad]
    assert len(caplog.records) == 1
    assert "step-000002" in caplog.records[0].getMessage()


def rewrite_manifest_entry(ckpt: Path, name: str, data: bytes):
    """Replace a file AND make the manifest agree, so only the decoder can notice."""
    (ckpt / name).write_bytes(data)
    m = json.loads((ckpt / "manifest.json").read_text())
    m["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(m))


def test_undecodable_files_with_matching_manifest(tmp_path):
    save_steps(tmp_path, [4])
    d = tmp_path / "checkpoints" / "step-000004"
    rewrite_manifest_entry(d, "policy.safetensors", b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(CorruptCheckpoint, match=r"step-000004/policy\.safetensors: unreadable safetensors"):
        load_checkpoint(d)
    save_steps(tmp_path, [5])
    d = tmp_path / "checkpoints" / "step-000005"
    rewrite_manifest_entry(d, "state.msgpack", b"\xc1")  # 0xc1 is never used in msgpack
    with pytest.raises(CorruptCheckpoint, match=r"step-000005/state\.msgpack: unreadable msgpack"):
        load_checkpoint(d)


def test_manifest_step_must_match_directory(tmp_path):
    save_steps(tmp_path, [3])
    d = tmp_path / "checkpoints" / "step-000003"
    d.rename(tmp_path / "checkpoints" / "step-000009")
    with pytest.raises(CorruptCheckpoint, match=r"manifest\.json: says step 3 but the directory is step-000009"):
        load_checkpoint(tmp_path / "checkpoints" / "step-000009")


def test_all_corrupt_raises_and_none_when_empty(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    save_steps(tmp_path, [1, 2])
    for s in (1, 2):
        truncate(tmp_path / "checkpoints" / f"step-00000{s}" / "state.msgpack")
    with pytest.raises(CorruptCheckpoint, match=r"no good checkpoint in .*step-000002/state\.msgpack.*"
                                                r"step-000001/state\.msgpack"):
        latest_checkpoint(tmp_path)


def test_half_written_temp_dir_is_ignored_then_cleaned(tmp_path):
    save_steps(tmp_path, [1])
    tmp = tmp_path / "checkpoints" / ".tmp-step-000002-abc123"  # a save that crashed mid-write
    tmp.mkdir()
    (tmp / "policy.safetensors").write_bytes(b"\x10\x00\x00")
    ck = latest_checkpoint(tmp_path)
    assert ck.step == 1 and ck.skipped == []
    save_steps(tmp_path, [2])
    assert step_names(tmp_path) == ["step-000001", "step-000002"]


def test_keep_prunes_older_checkpoints(tmp_path):
    for s in range(1, 6):
        save_checkpoint(tmp_path, s, weights(s), {"s": s}, keep=2)
    assert step_names(tmp_path) == ["step-000004", "step-000005"]
    assert latest_checkpoint(tmp_path).step == 5


def test_pruning_counts_only_complete_checkpoints(tmp_path):
    save_steps(tmp_path, [1, 2, 3], keep=3)
    truncate(tmp_path / "checkpoints" / "step-000003" / "policy.safetensors")
    save_steps(tmp_path, [4], keep=3)  # good: 4, 2, 1 -- 3 is incomplete, so nothing is deleted
    assert step_names(tmp_path) == ["step-000001", "step-000002", "step-000003", "step-000004"]
    save_steps(tmp_path, [5], keep=3)  # good: 5, 4, 2 -> 1 goes; the broken 3 stays for inspection
    assert step_names(tmp_path) == ["step-000002", "step-000003", "step-000004", "step-000005"]


def test_saving_an_existing_step_replaces_it(tmp_path):
    save_checkpoint(tmp_path, 5, weights(5), {"version": "first"})
    save_checkpoint(tmp_path, 5, weights(6), {"version": "second"})
    assert step_names(tmp_path) == ["step-000005"]
    ck = latest_checkpoint(tmp_path)
    assert ck.state == {"version": "second"} and torch.equal(ck.tensors["policy"]["w"], weights(6)["policy"]["w"])


def test_failed_save_leaves_previous_checkpoint_untouched(tmp_path):
    save_steps(tmp_path, [1])
    before = {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step-000001").iterdir()}
    # "policy" is written first; the meta tensor then fails for real while copying to CPU
    with pytest.raises((NotImplementedError, RuntimeError)):
        save_checkpoint(tmp_path, 2, {"policy": weights(2)["policy"], "bad": {"x": torch.empty(3, device="meta")}}, {})
    assert step_names(tmp_path) == ["step-000001"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "checkpoints" / "step-000001").iterdir()} == before


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"state\['ctrl'\]\['lam'\]\[1\] has type int64"):
        save_checkpoint(tmp_path, 1, {}, {"ctrl": {"lam": [1, np.int64(2)]}})
    with pytest.raises(ValueError, match=r"state\['x'\] has type Tensor.*put tensors in a tensor group"):
        save_checkpoint(tmp_path, 1, {}, {"x": torch.ones(1)})
    with pytest.raises(ValueError, match=r"tensor group name must match .* got '../evil'"):
        save_checkpoint(tmp_path, 1, {"../evil": {}}, {})
    with pytest.raises(ValueError, match=r"tensor group 'policy': entry 'w' must be str -> torch.Tensor"):
        save_checkpoint(tmp_path, 1, {"policy": {"w": [1.0]}}, {})
    with pytest.raises(ValueError, match="keep must be an int >= 1, got 0"):
        save_checkpoint(tmp_path, 1, {}, {}, keep=0)
    assert not (tmp_path / "checkpoints").exists() or step_names(tmp_path) == []


def test_tensors_sharing_memory_are_saved(tmp_path):
    base = torch.arange(10.0)
    save_checkpoint(tmp_path, 1, {"policy": {"base": base, "view": base[2:5], "tied": base}}, {})
    got = latest_checkpoint(tmp_path).tensors["policy"]
    assert torch.equal(got["base"], base) and torch.equal(got["tied"], base)
    assert got["view"].tolist() == [2.0, 3.0, 4.0]


def test_check_compatible_names_first_mismatch():
    torch.manual_seed(0)
    small = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    wide = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 2))
    check_compatible(small.state_dict(), small)
    with pytest.raises(ValueError, match=r"tensor '0\.weight' has shape \(16, 4\) in the checkpoint but \(8, 4\) in the model"):
        check_compatible(wide.state_dict(), small)
    sd = dict(small.state_dict())
    del sd["1.bias"]
    with pytest.raises(ValueError, match=r"lacks tensor '1\.bias' \(model shape \(2,\)\)"):
        check_compatible(sd, small)
    sd = dict(small.state_dict(), extra=torch.zeros(3))
    with pytest.raises(ValueError, match=r"has tensor 'extra' \(shape \(3,\)\) that the model does not"):
        check_compatible(sd, small.state_dict())


OPTIMIZERS = {
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-2, weight_decay=0.05),
    "amsgrad": lambda groups: torch.optim.AdamW(groups, lr=1e-2, betas=(0.8, 0.99), amsgrad=True),
    "tensor_lr": lambda groups: torch.optim.AdamW(groups, lr=torch.tensor(1e-2), foreach=False),
    "sgd_nesterov": lambda groups: torch.optim.SGD(groups, lr=1e-2, momentum=0.9, nesterov=True),
    "adafactor": lambda groups: torch.optim.Adafactor(groups, lr=1e-2),  # eps=(None, 1e-3): a tuple holding None
}


def make_model_and_optimizer(kind):
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "weight_decay": 0.0}]
    return model, OPTIMIZERS[kind](groups)


def train_step(model, opt, step):
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)
    opt.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()


@pytest.mark.parametrize("kind", sorted(OPTIMIZERS))
def test_optimizer_resume_is_bitwise_exact(tmp_path, kind):
    model, opt = make_model_and_optimizer(kind)
    for s in range(3):
        train_step(model, opt, s)
    opt_tensors, opt_plain = optimizer_state_to_tensors(opt.state_dict())
    save_checkpoint(tmp_path, 3, {"policy": model.state_dict(), "optimizer": opt_tensors}, {"optimizer": opt_plain})
    for s in range(3, 6):  # the uninterrupted run
        train_step(model, opt, s)

    ck = latest_checkpoint(tmp_path)
    model2, opt2 = make_model_and_optimizer(kind)
    check_compatible(ck.tensors["policy"], model2)
    model2.load_state_dict(ck.tensors["policy"])
    opt2.load_state_dict(optimizer_state_from_tensors(ck.tensors["optimizer"], ck.state["optimizer"]))
    for g1, g2 in zip(opt.param_groups, opt2.param_groups):  # tuples (betas, eps) come back as tuples
        assert {k: type(v) for k, v in g1.items()} == {k: type(v) for k, v in g2.items()}
    for s in range(3, 6):
        train_step(model2, opt2, s)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.equal(a, b), name
    for pid, st in opt.state_dict()["state"].items():
        for key, value in st.items():
            assert torch.equal(value, opt2.state_dict()["state"][pid][key]), (pid, key)


def test_optimizer_state_with_plain_values_round_trips():
    """Custom optimizers may keep ints or None in their per-parameter state (LBFGS-style counters)."""
    sd = {"state": {0: {"n_iter": 7, "prev_loss": None, "d": torch.arange(3.0)}, 2: {"d": torch.ones(2)}},
          "param_groups": [{"lr": 0.5, "eps": (None, 1e-3), "params": [0, 1, 2]}]}
    tensors, plain = optimizer_state_to_tensors(sd)
    assert set(tensors) == {"state.0.d", "state.2.d"}
    assert plain["state"] == {0: {"n_iter": 7, "prev_loss": None}, 2: {}}
    back = optimizer_state_from_tensors(tensors, plain)
    assert back["param_groups"] == sd["param_groups"] and back["state"][0]["n_iter"] == 7
    assert torch.equal(back["state"][0]["d"], sd["state"][0]["d"]) and back["state"][0]["prev_loss"] is None
    with pytest.raises(ValueError, match="optimizer state is keyed by 'w'; expected int parameter ids"):
        optimizer_state_to_tensors({"state": {"w": {}}, "param_groups": []})


def draws(gens):
    return (torch.rand(4).tolist(), random.random(), random.gauss(0, 1), np.random.randn(3).tolist(),
            [torch.rand(2, generator=gens[0]).tolist(), gens[1].standard_normal(2).tolist(),
             gens[2].integers(0, 2**62, 3).tolist()])


def test_rng_restore_reproduces_draws(tmp_path):
    torch.manual_seed(5)
    random.seed(5)
    np.random.seed(5)
    gens = [torch.Generator().manual_seed(9), np.random.default_rng(9), np.random.Generator(np.random.Philox(9))]
    draws(gens)
    random.gauss(0, 1)  # leaves a cached second gaussian in python's state
    np.random.randn(1)  # and one in numpy's legacy state
    gens[1].integers(0, 2**32, dtype=np.uint32)  # leaves a buffered half word in PCG64
    t, plain = rng_state(gens)
    save_checkpoint(tmp_path, 1, {"rng": t}, {"rng": plain})
    expected = draws(gens)  # uninterrupted

    for _ in range(3):  # wander off, as a crashed run would
        draws(gens)
    ck = latest_checkpoint(tmp_path)
    restore_rng(ck.tensors["rng"], ck.state["rng"], gens)
    assert draws(gens) == expected


def test_rng_generator_list_must_match():
    t, plain = rng_state([torch.Generator()])
    with pytest.raises(ValueError, match="holds 1 generator states but 0 generators were given"):
        restore_rng(t, plain, [])
    with pytest.raises(ValueError, match=r"generators\[0\] is a Generator but the checkpoint saved a torch generator"):
        restore_rng(t, plain, [np.random.default_rng(0)])
    with pytest.raises(ValueError, match=r"generators\[0\] is a RandomState"):
        rng_state([np.random.RandomState(0)])


CRASHING_WRITER = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[2])
    from orchestrator.checkpoint import save_checkpoint
    torch.set_num_threads(1)
    big = {"policy": {"w": torch.randn(512, 1024)}, "optimizer": {"m": torch.randn(512, 1024)}}
    for step in range(1, 10_000):
        big["policy"]["w"][0, 0] = step
        save_checkpoint(sys.argv[1], step, big, {"step": step}, keep=2)
        print(step, flush=True)
""")


@pytest.mark.slow
def test_killed_writer_leaves_only_complete_checkpoints(tmp_path):
    """SIGKILL a process in the middle of saving (at a random moment): whatever it was doing,
    every step-* directory loads cleanly and the newest is at least the last one reported saved."""
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, str(tmp_path), str(ROOT)],
                            stdout=subprocess.PIPE, text=True)
    try:
        saved = [int(proc.stdout.readline()) for _ in range(3)]
        time.sleep(random.uniform(0.0, 0.3))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    dirs = sorted((tmp_path / "checkpoints").glob("step-*"))
    assert dirs
    for d in dirs:
        ck = load_checkpoint(d)
        assert ck.tensors["policy"]["w"][0, 0].item() == ck.step == ck.state["step"]
    ck = latest_checkpoint(tmp_path)
    assert ck.skipped == [] and ck.step >= saved[-1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors_and_cuda_rng(tmp_path):
    w = torch.randn(4, 4, device="cuda")
    torch.cuda.manual_seed_all(3)
    t, plain = rng_state()
    assert "torch_cuda.0" in t
    save_checkpoint(tmp_path, 1, {"policy": {"w": w}, "rng": t}, {"rng": plain})
    expected = torch.rand(5, device="cuda").cpu()
    torch.rand(7, device="cuda")
    ck = latest_checkpoint(tmp_path)
    assert torch.equal(ck.tensors["policy"]["w"], w.cpu())
    restore_rng(ck.tensors["rng"], ck.state["rng"])
    assert torch.equal(torch.rand(5, device="cuda").cpu(), expected)
