"""Progress bars written to a file or pipe come out as lines, not one line of carriage returns."""

import io

from tqdm import tqdm

from orchestrator.cli import _ProgressLines


def test_bar_redraws_become_separate_lines():
    out = io.StringIO()
    for _ in tqdm(range(4), desc="train", file=_ProgressLines(out), mininterval=0, miniters=1):
        pass
    text = out.getvalue()
    assert "\r" not in text
    lines = [ln for ln in text.splitlines() if ln]
    assert len(lines) >= 5 and all(ln.startswith("train:") for ln in lines)  # 0/4 .. 4/4, each its own line
    assert "4/4" in lines[-1]
