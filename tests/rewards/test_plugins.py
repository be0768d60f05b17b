"""Scorer plug-ins (`kind: python`): a class from a module outside the package, loaded by name, checked by
RewardScorer: its numbers come through unchanged; its mistakes are named."""

import itertools
import textwrap

import numpy as np
import pytest

from rewards import oracle, world
from rewards.errors import DataError
from rewards.scorer import RewardScorer, load_callable

_count = itertools.count()

PLUGIN = '''
import numpy as np
from rewards.errors import DataError

class Brightness:
    """Mean of each clip's brightest channel, times `scale`; a prompt with "magenta" is refused by name."""
    dims = ("bright",)
    version = "brightness-1"

    def __init__(self, scale=1.0, device="cpu", mode="ok"):
        self.scale, self.device, self.mode = scale, device, mode

    def score(self, batch):
        for sid, p in zip(batch["ids"], batch["prompts"]):
            if "magenta" in p:
                raise DataError(sid, "no magenta here")
        v = batch["videos"].astype(np.float32).max(-1).mean((1, 2, 3)) / 255 * self.scale
        if self.mode == "wrong_dims":
            return {"brightness": v}
        if self.mode == "wrong_shape":
            return {"bright": v[:, None].repeat(2, 1)}
        if self.mode == "nan":
            v[1] = np.nan
        if self.mode == "extras":
            v = v + np.asarray(batch["beat"]).sum(1)
        return {"bright": v}

class NotAScorer:
    pass
'''


def _module(tmp_path, text=PLUGIN):
    """Write the plug-in under a fresh module name (outside the package) -> (callable prefix, directory)."""
    name = f"plugin_{next(_count)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
    return name, str(tmp_path)


def _batch(n=5, seed=0):
    videos, prompts = world.sft_dataset(n, seed=seed)
    return world.to_uint8(videos), [p.text.replace("magenta", "red") for p in prompts], [f"s{i}" for i in range(n)]


def test_a_python_scorer_from_outside_the_package_scores_through_the_contract(tmp_path):
    name, path = _module(tmp_path)
    videos, prompts, ids = _batch()
    scorer = RewardScorer("python", callable=f"{name}:Brightness", pythonpath=[path], kwargs={"scale": 10.0})
    scores = scorer.score(videos, prompts, ids)
    direct = videos.astype(np.float32).max(-1).mean((1, 2, 3)) / 255 * 10.0
    assert scorer.dims == ("bright",) and scorer.version == "brightness-1" and scores.shape == (5, 1)
    np.testing.assert_allclose(scores[:, 0], direct, rtol=1e-6)
    assert np.ptp(scores) > 0.01
    assert scorer.plugin.device == "cpu"  # a scorer taking `device` is placed (no GPU here)
    # extra batch fields reach the scorer as they are
    extras = RewardScorer("python", callable=f"{name}:Brightness", pythonpath=[path], kwargs={"mode": "extras"})
    beat = np.arange(5 * 8, dtype=np.float32).reshape(5, 8)
    np.testing.assert_allclose(extras.score(videos, prompts, ids, beat=beat)[:, 0], direct / 10 + beat.sum(1), rtol=1e-6)


def test_the_builtin_kinds_are_plugins_of_the_same_contract():
    videos, prompts, ids = _batch()
    plugin = RewardScorer("oracle").plugin
    out = plugin.score({"ids": ids, "videos": videos, "prompts": prompts})
    direct = oracle.score_batch(videos, prompts)
    assert tuple(out) == plugin.dims == ("vq", "mq", "ta") and plugin.version == "oracle"
    for d in plugin.dims:
        np.testing.assert_array_equal(out[d], direct[d])


@pytest.mark.parametrize("mode, message, sample", [
    ("wrong_dims", r"returned dims \['brightness'\], expected \['bright'\]", "s0"),
    ("wrong_shape", r"returned bright of shape \[5, 2\], expected \[5\]", "s0"),
    ("nan", "non-finite bright score nan", "s1"),
])
def test_a_scorer_returning_wrong_dims_shapes_or_nan_is_a_data_error_naming_a_sample(tmp_path, mode, message, sample):
    name, path = _module(tmp_path)
    videos, prompts, ids = _batch()
    scorer = RewardScorer("python", callable=f"{name}:Brightness", pythonpath=[path], kwargs={"mode": mode})
    with pytest.raises(DataError, match=message) as err:
        scorer.score(videos, prompts, ids)
    assert err.value.sample_id == sample


def test_a_data_error_raised_by_the_plugin_names_its_sample(tmp_path):
    name, path = _module(tmp_path)
    videos, prompts, ids = _batch()
    prompts[3] = "a magenta square moving up slowly"
    with pytest.raises(DataError, match="no magenta here") as err:
        RewardScorer("python", callable=f"{name}:Brightness", pythonpath=[path]).score(videos, prompts, ids)
    assert err.value.sample_id == "s3"


def test_a_callable_that_does_not_import_or_is_not_a_scorer_is_named(tmp_path):
    name, path = _module(tmp_path)
    with pytest.raises(ValueError, match=r"'no_such_module_xyz:Cls': cannot import 'no_such_module_xyz'"):
        load_callable("no_such_module_xyz:Cls")
    with pytest.raises(ValueError, match=rf"'{name}:Missing': module '{name}' has no 'Missing'"):
        load_callable(f"{name}:Missing", [path])
    with pytest.raises(ValueError, match=rf"'{name}:NotAScorer' is not a scorer"):
        load_callable(f"{name}:NotAScorer", [path])
    with pytest.raises(ValueError, match="not of the form 'pkg.module:Class'"):
        load_callable("just_a_module")
    broken, _ = _module(tmp_path, "raise RuntimeError('half-installed dependency')\n")
    with pytest.raises(ValueError, match="RuntimeError: half-installed dependency"):
        load_callable(f"{broken}:X", [path])
