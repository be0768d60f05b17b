"""Training checkpoints: atomic, verified, and complete enough for `videorl train --resume RUN_DIR`.

Layout: `run_dir/checkpoints/step-000123/` holds one `<group>.safetensors` per tensor group
("policy", "optimizer", "reference", "anchor", "old", "rng", ...), `state.msgpack` (plain python:
controller state, data cursor, ledger, metrics offset, RNG states) and `manifest.json`
(step, format version, byte size and sha256 of every file), written last.

Guarantees:
- Atomic: everything is written into `checkpoints/.tmp-*`, fsync'd, then renamed into place, so a
  crash at any point leaves either the previous set or the new complete checkpoint. Pruned
  checkpoints are renamed into `.tmp-*` before deletion, so none is ever seen half-deleted.
  Leftover `.tmp-*` entries are never read, and the next save removes them (one writer per run dir).
- Verified: `load_checkpoint` checks every file against the manifest; a missing, truncated,
  altered or undecodable file raises `CorruptCheckpoint` naming the file and what is wrong.
  `latest_checkpoint` skips (and logs) corrupt checkpoints and returns the newest good one.
- Safe to load: tensors are read with safetensors and state with msgpack, never pickle.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from orchestrator.hashing import file_sha256

logger = logging.getLogger(__name__)

FORMAT = "videorl-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"
STATE = "state.msgpack"
TMP_PREFIX = ".tmp-"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_GROUP = re.compile(r"^[A-Za-z0-9_-]+$")
_FILE = re.compile(r"^[A-Za-z0-9_.-]+\.(safetensors|msgpack)$")


class CorruptCheckpoint(ValueError):
    """A checkpoint file is missing, truncated, altered or undecodable; the message names the file."""


@dataclass
class Checkpoint:
    """A loaded checkpoint. `skipped`: newer checkpoints found corrupt, as (directory, reason)."""

    step: int
    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict
    path: Path
    skipped: list[tuple[Path, str]] = field(default_factory=list)


# ---------------------------------------------------------------- saving


def save_checkpoint(run_dir: str | os.PathLike, step: int, tensors: Mapping[str, Mapping[str, torch.Tensor]],
                    state: dict, keep: int = 3) -> Path:
    """Write `run_dir/checkpoints/step-{step:06d}/` atomically and prune to the newest `keep` good ones.

    tensors: group name -> {tensor name -> tensor} (any device/dtype; saved as CPU copies).
    state: plain python (None, bool, int, float, str, bytes, list, tuple, dict); tuples load back as lists.
    Saving a step that already exists replaces it (the old one is moved aside first; a crash
    between the two renames loses that step but leaves the older ones). Returns the checkpoint directory.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        raise ValueError(f"keep must be an int >= 1, got {keep!r}")
    for group, named in tensors.items():
        _check_group(group, named)
    if not isinstance(state, dict):
        raise ValueError(f"state must be a dict, got {type(state).__name__}")
    _check_plain(state, "state")

    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(TMP_PREFIX + "*"):  # from a crashed save; we are the only writer
        _remove(leftover)
    final = root / f"step-{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{final.name}-", dir=root))
    try:
        files = {}
        for group, named in tensors.items():
            path = tmp / f"{group}.safetensors"
            save_file(_for_disk(named), str(path))
            files[path.name] = _fsync_and_describe(path)
        (tmp / STATE).write_bytes(msgpack.packb(state, use_bin_type=True))
        files[STATE] = _fsync_and_describe(tmp / STATE)
        manifest = {"format": FORMAT, "version": VERSION, "step": step, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        _fsync_and_describe(tmp / MANIFEST)
        _fsync_dir(tmp)
        replaced = None
        if final.exists():  # moved aside, not deleted, until the new one is in place
            replaced = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}replaced-{final.name}-", dir=root))
            final.rename(replaced / final.name)
        os.rename(tmp, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if replaced is not None:
        shutil.rmtree(replaced, ignore_errors=True)
    _prune(root, step, keep)
    return final


def _check_group(group: object, named: object) -> None:
    if not isinstance(group, str) or not _GROUP.match(group):
        raise ValueError(f"tensor group name must match [A-Za-z0-9_-]+, got {group!r}")
    if not isinstance(named, Mapping):
        raise ValueError(f"tensor group {group!r} must be a dict of name -> tensor, got {type(named).__name__}")
    for name, t in named.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise ValueError(f"tensor group {group!r}: entry {name!r} must be str -> torch.Tensor, "
                             f"got {type(name).__name__} -> {type(t).__name__}")


def _check_plain(value: object, where: str) -> None:
    """Raise ValueError naming the first value msgpack cannot store exactly (e.g. a numpy float)."""
    if value is None or isinstance(value, (bool, float, str, bytes)):
        return
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise ValueError(f"{where} = {value} does not fit in 64 bits; store it as a str")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise ValueError(f"{where} has key {k!r} of type {type(k).__name__}; keys must be str or int")
            _check_plain(v, f"{where}[{k!r}]")
    else:
        raise ValueError(f"{where} has type {type(value).__name__}; checkpoint state must be plain python "
                         "(None, bool, int, float, str, bytes, list, dict) - put tensors in a tensor group")


def _for_disk(named: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, and no two tensors sharing storage (safetensors refuses shared memory)."""
    out, seen = {}, set()
    for name, t in named.items():
        t = t.detach().cpu().contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen and t.numel() > 0:
            t = t.clone()
        seen.add(key)
        out[name] = t
    return out


def _fsync_and_describe(path: Path) -> dict:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"bytes": path.stat().st_size, "sha256": file_sha256(path)}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every `step-N` directory, newest first; temp entries are not listed."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return sorted(found, reverse=True)


def _prune(root: Path, step: int, keep: int) -> None:
    """Keep the checkpoint just written and the `keep - 1` newest older ones that look complete.

    Complete = manifest readable and every file present with its recorded size (no hashing, so
    pruning stays cheap for large models). Corrupt ones newer than the oldest kept stay for
    inspection; checkpoints newer than `step` (from before a resume) are left alone.
    """
    good = 1
    for s, path in _step_dirs(root):
        if s >= step:
            continue
        if good >= keep:  # renamed first: a crash mid-delete must not leave a half-deleted step-N
            doomed = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}pruned-{path.name}-", dir=root))
            path.rename(doomed / path.name)
            shutil.rmtree(doomed, ignore_errors=True)
        elif _looks_complete(path):
            good += 1


def _looks_complete(path: Path) -> bool:
    try:
        files = _read_manifest(path)["files"]
        return all((path / n).is_file() and (path / n).stat().st_size == f["bytes"] for n, f in files.items())
    except (CorruptCheckpoint, OSError):
        return False


# ---------------------------------------------------------------- loading


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Load and verify one checkpoint directory; any problem raises `CorruptCheckpoint` naming the file."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint directory not found: {path}")
    manifest = _read_manifest(path)
    for name, info in manifest["files"].items():
        f = path / name
        if not f.is_file():
            raise CorruptCheckpoint(f"{f}: missing (listed in {MANIFEST})")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CorruptCheckpoint(f"{f}: {size} bytes but {MANIFEST} says {info['bytes']} (truncated or overwritten)")
        digest = file_sha256(f)
        if digest != info["sha256"]:
            raise CorruptCheckpoint(f"{f}: sha256 {digest[:16]}... differs from {MANIFEST}'s "
                                    f"{info['sha256'][:16]}... (the file changed after it was written)")
    tensors = {}
    for name in manifest["files"]:
        if name.endswith(".safetensors"):
            try:
                tensors[name.removesuffix(".safetensors")] = load_file(str(path / name))
            except Exception as e:  # the decoder's own error types vary; report all of them by file
                raise CorruptCheckpoint(f"{path / name}: unreadable safetensors ({e})") from e
    try:
        state = msgpack.unpackb((path / STATE).read_bytes(), raw=False, strict_map_key=False)
    except Exception as e:
        raise CorruptCheckpoint(f"{path / STATE}: unreadable msgpack ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"{path / STATE}: holds a {type(state).__name__}, expected a dict")
    return Checkpoint(manifest["step"], tensors, state, path)


def _read_manifest(path: Path) -> dict:
    """The parsed, structurally checked manifest of checkpoint directory `path`."""
    mpath = path / MANIFEST
    if not mpath.is_file():
        raise CorruptCheckpoint(f"{mpath}: missing (the checkpoint was never completed)")
    try:
        m = json.loads(mpath.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptCheckpoint(f"{mpath}: not valid JSON ({e})") from e
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CorruptCheckpoint(f"{mpath}: not a {FORMAT} manifest")
    if m.get("version") != VERSION:
        raise CorruptCheckpoint(f"{mpath}: format version {m.get('version')!r}, this code reads version {VERSION}")
    step, files = m.get("step"), m.get("files")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise CorruptCheckpoint(f"{mpath}: bad step {step!r}")
    if (d := _STEP_DIR.match(path.name)) and int(d.group(1)) != step:
        raise CorruptCheckpoint(f"{mpath}: says step {step} but the directory is {path.name}")
    if not isinstance(files, dict) or STATE not in files:
        raise CorruptCheckpoint(f"{mpath}: no file list with {STATE}")
    for name, info in files.items():
        if not _FILE.match(name) or not isinstance(info, dict) or not isinstance(info.get("bytes"), int) \
                or not isinstance(info.get("sha256"), str):
            raise CorruptCheckpoint(f"{mpath}: bad file entry {name!r}: {info!r}")
    return m


def latest_checkpoint(run_dir: str | os.PathLike) -> Checkpoint | None:
    """The newest good checkpoint of a run, or None if it has none.

    A corrupt checkpoint is logged (warning, naming the file) and listed in `Checkpoint.skipped`;
    the next older one is tried. If checkpoints exist but none is good, raises `CorruptCheckpoint`
    listing them all (starting from scratch silently would be worse).
    """
    skipped: list[tuple[Path, str]] = []
    for _, path in _step_dirs(Path(run_dir) / "checkpoints"):
        try:
            ckpt = load_checkpoint(path)
        except CorruptCheckpoint as e:
            logger.warning("skipping corrupt checkpoint %s", e)
            skipped.append((path, str(e)))
            continue
        ckpt.skipped = skipped
        return ckpt
    if skipped:
        raise CorruptCheckpoint(f"no good checkpoint in {Path(run_dir) / 'checkpoints'}: "
                                + "; ".join(reason for _, reason in skipped))
    return None


def check_compatible(tensors: Mapping[str, torch.Tensor], model: torch.nn.Module | Mapping[str, torch.Tensor]) -> None:
    """Raise ValueError naming the first tensor whose presence or shape differs between checkpoint and model."""
    expected = model.state_dict() if isinstance(model, torch.nn.Module) else model
    for name, t in expected.items():
        if name not in tensors:
            raise ValueError(f"checkpoint does not fit the model: it lacks tensor {name!r} (model shape {tuple(t.shape)})")
        if tuple(tensors[name].shape) != tuple(t.shape):
            raise ValueError(f"checkpoint does not fit the model: tensor {name!r} has shape "
                             f"{tuple(tensors[name].shape)} in the checkpoint but {tuple(t.shape)} in the model")
    for name, t in tensors.items():
        if name not in expected:
            raise ValueError(f"checkpoint does not fit the model: it has tensor {name!r} "
                             f"(shape {tuple(t.shape)}) that the model does not")


# ---------------------------------------------------------------- optimizer state


def optimizer_state_to_tensors(opt_state: Mapping) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors ("state.<param id>.<name>", "param_groups.<i>.<key>")
    and plain python, so both fit a checkpoint. Inverse: `optimizer_state_from_tensors`.
    The tensors are the optimizer's own (not copies): save them before the next step.
    """
    tensors: dict[str, torch.Tensor] = {}
    state: dict[int, dict] = {}
    for pid, entries in opt_state["state"].items():
        if isinstance(pid, bool) or not isinstance(pid, int):
            raise ValueError(f"optimizer state is keyed by {pid!r}; expected int parameter ids")
        state[pid] = {}
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{name}"] = value
            else:
                state[pid][name] = value
    groups = []
    for i, group in enumerate(opt_state["param_groups"]):
        plain = {"_tuples": [k for k, v in group.items() if isinstance(v, tuple)]}  # e.g. betas
        for key, value in group.items():
            if isinstance(value, torch.Tensor):  # e.g. a tensor learning rate
                tensors[f"param_groups.{i}.{key}"] = value
            else:
                plain[key] = list(value) if isinstance(value, tuple) else value
        groups.append(plain)
    return tensors, {"state": state, "param_groups": groups}


def optimizer_state_from_tensors(tensors: Mapping[str, torch.Tensor], plain: Mapping) -> dict:
    """Rebuild the `optimizer.state_dict()` that `optimizer_state_to_tensors` split; feed it to `load_state_dict`."""
    state = {int(pid): dict(entries) for pid, entries in plain["state"].items()}
    groups = []
    for group in plain["param_groups"]:
        tuples = group["_tuples"]
        groups.append({k: tuple(v) if k in tuples else v for k, v in group.items() if k != "_tuples"})
    for key, t in tensors.items():
        kind, index, name = key.split(".", 2)
        if kind == "state":
            state.setdefault(int(index), {})[name] = t
        elif kind == "param_groups":
            groups[int(index)][name] = t
        else:
            raise ValueError(f"unexpected optimizer tensor {key!r}")
    return {"state": state, "param_groups": groups}


# ---------------------------------------------------------------- RNG state


def seed_global_rngs(seed: int) -> None:
    """torch's (CPU and CUDA), numpy's and python's global generators from one seed (any int; numpy's takes it
    modulo 2**32)."""
    torch.manual_seed(seed % 2**63)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state(generators: Sequence[torch.Generator | np.random.Generator] = ()) -> tuple[dict[str, torch.Tensor], dict]:
    """Capture torch's CPU (and CUDA, if available) generators, python `random`, numpy's global state
    and the given generator objects, as (tensors, plain). Inverse: `restore_rng`."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda.{i}"] = s
    version, internal, gauss_next = random.getstate()
    plain = {"python": [version, list(internal), gauss_next],
             "numpy": _np_state_json(np.random.get_state(legacy=False)), "generators": []}
    for i, g in enumerate(generators):
        if isinstance(g, torch.Generator):
            tensors[f"generator.{i}"] = g.get_state()
            plain["generators"].append({"kind": "torch"})
        elif isinstance(g, np.random.Generator):
            plain["generators"].append({"kind": "numpy", "state": _np_state_json(g.bit_generator.state)})
        else:
            raise ValueError(f"generators[{i}] is a {type(g).__name__}; expected torch.Generator or np.random.Generator")
    return tensors, plain


def restore_rng(tensors: Mapping[str, torch.Tensor], plain: Mapping,
                generators: Sequence[torch.Generator | np.random.Generator] = ()) -> None:
    """Put back the states captured by `rng_state` (pass the same generators, in the same order)."""
    kinds = [g["kind"] for g in plain["generators"]]
    if len(kinds) != len(generators):
        raise ValueError(f"the checkpoint holds {len(kinds)} generator states but {len(generators)} generators were given")
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            logger.warning("checkpoint has CUDA RNG states for %d devices, this process sees %d; restoring the overlap",
                           len(cuda), torch.cuda.device_count())
        for i, key in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(tensors[key], i)
    version, internal, gauss_next = plain["python"]
    random.setstate((version, tuple(internal), gauss_next))
    np.random.set_state(_np_state_from_json(plain["numpy"]))
    for i, (g, saved) in enumerate(zip(generators, plain["generators"])):
        if saved["kind"] == "torch" and isinstance(g, torch.Generator):
            g.set_state(tensors[f"generator.{i}"])
        elif saved["kind"] == "numpy" and isinstance(g, np.random.Generator):
            g.bit_generator.state = _np_state_from_json(saved["state"])
        else:
            raise ValueError(f"generators[{i}] is a {type(g).__name__} but the checkpoint saved a {saved['kind']} generator")


def _np_state_json(state: dict) -> str:
    """numpy bit-generator states hold 128-bit ints and arrays; JSON keeps both exactly (msgpack cannot)."""
    def encode(o):
        if isinstance(o, np.ndarray):
            return {"__ndarray__": o.tolist(), "dtype": str(o.dtype)}
        if isinstance(o, np.generic):
            return o.item()
        raise TypeError(f"cannot store {type(o).__name__} in an RNG state")
    return json.dumps(state, default=encode)


def _np_state_from_json(text: str) -> dict:
    def decode(d):
        return np.array(d["__ndarray__"], dtype=d["dtype"]) if "__ndarray__" in d else d
    return json.loads(text, object_hook=decode)
