"""Content hashes: of files (checkpoint manifests, cache keys), of config sections, and of the code that makes
a cached thing, so a cache key changes whenever the config, the inputs or the code behind an output change."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import BaseModel

# the code that loads and runs a policy, any backend
POLICY_CODE = ("policy.backend", "policy.model", "policy.wan.policy", "policy.wan.loading", "policy.wan.text",
               "policy.wan.vae")
# the code that draws clips from a base model (preference data, engagement logs, calibration)
SAMPLING_CODE = (*POLICY_CODE, "policy.sampling", "policy.sde")


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(*parts: BaseModel | str | int | float) -> str:
    """Short stable hash of config sections and plain values (hashes, names, `code_version`s): a cache key."""
    blob = json.dumps([p.model_dump(mode="json") if isinstance(p, BaseModel) else p for p in parts], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def code_version(*modules: str) -> str:
    """Hash of the named modules' source files, part of the cache key of what they make: a cached base model,
    dataset or reward model made by different code is never reused (it might not even load)."""
    digest = hashlib.sha256()
    for name in modules:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.origin:
            raise ValueError(f"code_version: no source file for module {name!r}")
        digest.update(Path(spec.origin).read_bytes())
    return digest.hexdigest()[:12]


BIG_FILE = 512 << 20  # files this large are keyed by size and modification time, not read (multi-GB weights)


def tree_sha256(path: str | Path) -> str:
    """Hash of a file, or of every file under a directory (relative names and contents): the key of a model
    directory such as a diffusers checkpoint. Files over BIG_FILE bytes count by (size, mtime) instead of content."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    digest = hashlib.sha256()
    for f in files:
        st = f.stat()
        key = f"{st.st_size}:{st.st_mtime_ns}" if st.st_size > BIG_FILE else file_sha256(f)
        digest.update(f"{f.relative_to(path) if f != path else f.name}:{key};".encode())
    return digest.hexdigest()


@contextmanager
def building(entry: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on `.<entry>.lock` (hidden: globs over the cache see entries only) while a cache entry
    is checked and built: a second process (another run or sweep sharing the cache) asking for the same entry waits
    for the first and then finds it built, instead of building it again into the same temporary directory. The lock
    goes with the process if it dies."""
    entry = Path(entry)
    entry.parent.mkdir(parents=True, exist_ok=True)
    with open(entry.with_name(f".{entry.name}.lock"), "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
