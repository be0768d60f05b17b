"""The `data.prompts` file: one prompt a line, checked before any actor starts.

Blank lines and lines starting with '#' are skipped; surrounding whitespace is stripped; a UTF-8
byte-order mark is accepted. Every problem is one line naming the file (and the line, where there is one).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def load_prompt_file(path: str | os.PathLike, max_chars: int = 200,
                     validate: Callable[[str], object] | None = None) -> list[str]:
    """Prompts of `path`, in file order (duplicates kept).

    max_chars: the longest prompt allowed, in characters after stripping.
    validate: called on each prompt (e.g. the world's `Prompt.parse`); its ValueError is re-raised
    as "<file>:<line>: <message>".
    Raises FileNotFoundError (missing file) or ValueError (a directory, not UTF-8, a NUL byte,
    a prompt over max_chars, a prompt `validate` rejects, no prompts at all).
    """
    if isinstance(max_chars, bool) or not isinstance(max_chars, int) or max_chars < 1:
        raise ValueError(f"max_chars must be an int >= 1, got {max_chars!r}")
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a prompt file")
    if not path.exists():
        raise FileNotFoundError(f"{path}: prompt file not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise ValueError(f"{path}:{line}: not UTF-8 (byte 0x{data[e.start]:02x} at byte offset {e.start})") from None

    prompts = []
    for number, raw in enumerate(text.split("\n"), start=1):  # not splitlines(): it also splits on \x0c, \u2028, ...
        if "\x00" in raw:
            raise ValueError(f"{path}:{number}: NUL byte at column {raw.index(chr(0)) + 1} (binary or UTF-16 file?)")
        prompt = raw.strip()
        if not prompt or prompt.startswith("#"):
            continue
        if len(prompt) > max_chars:
            raise ValueError(f"{path}:{number}: prompt is {len(prompt)} characters, over the limit of {max_chars}")
        if validate is not None:
            try:
                validate(prompt)
            except ValueError as e:
                message = "; ".join(part.strip() for part in str(e).splitlines() if part.strip())
                raise ValueError(f"{path}:{number}: {message}") from e
        prompts.append(prompt)
    if not prompts:
        raise ValueError(f"{path}: no prompts (the file is empty or holds only blank lines and # comments)")
    return prompts
