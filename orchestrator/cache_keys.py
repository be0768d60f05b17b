"""What a cache key needs besides the config: the version of the code that makes the cached thing."""

from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path


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
