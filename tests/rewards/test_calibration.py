"""rewards/calibration.py: τ_c = μ_c + k_c·σ_c (MATH.md §5) with hand-computed numbers, profiles, the JSON file."""
import json
import math
import os

import numpy as np
import pytest

from rewards.calibration import (
    Profile,
    available_profiles,
    calibrate,
    load_profile,
    profile_taus,
    read_calibration,
    summarize_scores,
    write_calibration,
)

# by hand: vq mean 0.5, squared deviations .09 + .01 + .01 + .09 = .2, σ = sqrt(.2/3) = 0.258199
#          mq mean 0.5, σ = sqrt(4 * .25 / 3) = 0.577350
#          ta mean 0.3, squared deviations .04 + 0 + .01 + .09 = .14, σ = sqrt(.14/3) = 0.216025
SCORES = {
    "vq": np.array([0.2, 0.4, 0.6, 0.8]),
    "mq": np.array([0.0, 0.0, 1.0, 1.0]),
    "ta": np.array([0.1, 0.3, 0.2, 0.6]),
    "feedback": np.array([1.0, 0.0, 0.0, 1.0]),
}


def test_tau_formula_with_hand_computed_numbers():
    vga = Profile(name="vga", primary="feedback", constraints={"vq": 1.1, "mq": 1.1, "ta": 1.1})
    res = calibrate(SCORES, vga)
    c = res["constraints"]
    assert res["profile"] == "vga" and list(c) == ["vq", "mq", "ta"]
    np.testing.assert_allclose([c["vq"]["mu"], c["vq"]["sigma"], c["vq"]["tau"]], [0.5, 0.258199, 0.784019], atol=1e-6)
    np.testing.assert_allclose([c["mq"]["mu"], c["mq"]["sigma"], c["mq"]["tau"]], [0.5, 0.577350, 1.135085], atol=1e-6)
    np.testing.assert_allclose([c["ta"]["mu"], c["ta"]["sigma"], c["ta"]["tau"]], [0.3, 0.216025, 0.537627], atol=1e-6)
    assert all(v["k"] == 1.1 and v["n"] == 4 for v in c.values())
    assert res["primary"]["name"] == "feedback"
    np.testing.assert_allclose([res["primary"]["mu"], res["primary"]["sigma"]], [0.5, 0.577350], atol=1e-6)
    # the same alignment scores under SCRL's looser modules
    assert calibrate(SCORES, Profile(name="i", primary="feedback", constraints={"ta": 0.8}))["constraints"]["ta"][
        "tau"] == pytest.approx(0.472820, abs=1e-6)
    assert calibrate(SCORES, Profile(name="r", primary="feedback", constraints={"ta": 0.3}))["constraints"]["ta"][
        "tau"] == pytest.approx(0.364807, abs=1e-6)
    # k = 0: the threshold is the base model's mean
    assert calibrate(SCORES, Profile(name="z", primary="feedback", constraints={"vq": 0}))["constraints"]["vq"][
        "tau"] == pytest.approx(0.5)


def test_summary_of_every_reward():
    s = summarize_scores(SCORES)
    assert set(s) == set(SCORES)
    assert s["ta"] == pytest.approx({"mean": 0.3, "std": 0.216025, "min": 0.1, "max": 0.6, "n": 4}, abs=1e-6)


def test_bad_scores_name_the_culprit():
    vga = load_profile("video_generation")
    bad = {**SCORES, "mq": np.array([0.0, 0.0, np.nan, 1.0])}
    with pytest.raises(ValueError, match=r"'mq'.*nan.*sample 2"):
        calibrate(bad, vga)
    with pytest.raises(ValueError, match=r"'vq'.*inf.*sample 0"):
        summarize_scores({"vq": np.array([np.inf, 1.0])})
    with pytest.raises(ValueError, match=r"no scores for reward\(s\) \['ta'\]; scores given: \['feedback', 'mq', 'vq'\]"):
        calibrate({k: v for k, v in SCORES.items() if k != "ta"}, vga)
    with pytest.raises(ValueError, match=r"different numbers of samples"):
        calibrate({**SCORES, "ta": np.array([0.1, 0.2, 0.3])}, vga)
    with pytest.raises(ValueError, match=r"scores\['vq'\] must be \[N\], got shape \[2, 2\]"):
        calibrate({**SCORES, "vq": np.ones((2, 2))}, vga)
    with pytest.raises(ValueError, match=r"at least 2"):
        calibrate({k: v[:1] for k, v in SCORES.items()}, vga)


def test_shipped_profiles_mirror_scrl():
    assert available_profiles() == ["audio_sync", "instruction", "retrieval", "video_generation"]
    assert load_profile("audio_sync") == Profile(name="audio_sync", primary="ta", constraints={"sync": 1.0, "vq": 0.5})
    assert load_profile("video_generation") == Profile(
        name="video_generation", primary="feedback", constraints={"vq": 1.1, "mq": 1.1, "ta": 1.1})
    assert load_profile("instruction") == Profile(name="instruction", primary="feedback", constraints={"ta": 0.8})
    assert load_profile("retrieval") == Profile(name="retrieval", primary="feedback", constraints={"ta": 0.3})


def test_profile_by_path_and_validation(tmp_path):
    f = tmp_path / "strict_motion.yaml"
    f.write_text("primary: feedback\nconstraints: {mq: 2.0}\n")
    assert load_profile(f) == Profile(name="strict_motion", primary="feedback", constraints={"mq": 2.0})
    assert load_profile(str(f)).name == "strict_motion"  # a string path works too

    with pytest.raises(ValueError, match=r"unknown profile 'vga'; available: \['audio_sync', 'instruction', 'retrieval', "
                                         r"'video_generation'\]"):
        load_profile("vga")
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_profile(tmp_path / "nope.yaml")
    cases = {
        "primary: feedback\nconstraints: {feedback: 1.0, ta: 0.3}\n": "primary reward 'feedback' is also a constraint",
        "primary: feedback\nconstraints: {ta: -0.5}\n": r"constraints\.ta: Input should be greater than or equal to 0",
        "primary: feedback\nconstraints: {ta: .nan}\n": r"constraints\.ta",
        "primary: feedback\nconstraints: {}\n": "constraints",
        "primary: feedback\nconstraints: {ta: 0.3}\nweights: 1\n": "weights: Extra inputs are not permitted",
        "constraints: {ta: 0.3}\n": "primary: Field required",
        "- just\n- a list\n": "expected a mapping",
        "primary: [unclosed\n": "not valid YAML",
    }
    for text, message in cases.items():
        f.write_text(text)
        with pytest.raises(ValueError, match=message) as err:
            load_profile(f)
        assert str(f) in str(err.value), "the error names the file"
    with pytest.raises(ValueError, match="also a constraint"):
        Profile(name="x", primary="ta", constraints={"ta": 1.0})


def test_write_read_roundtrip_and_taus(tmp_path):
    result = {"seed": 3, "profiles": {p: calibrate(SCORES, load_profile(p)) for p in available_profiles() if p != "audio_sync"}}
    path = write_calibration(tmp_path / "sub" / "calibration.json", result)
    assert read_calibration(path) == result
    assert os.listdir(path.parent) == ["calibration.json"], "no temp file left behind"
    assert profile_taus(read_calibration(path), "video_generation") == pytest.approx(
        {"vq": 0.784019, "mq": 1.135085, "ta": 0.537627}, abs=1e-6)
    assert profile_taus(result, "retrieval") == pytest.approx({"ta": 0.364807}, abs=1e-6)
    with pytest.raises(ValueError, match=r"no profile 'vga'; it has \['instruction', 'retrieval', 'video_generation'\]"):
        profile_taus(result, "vga")


def test_calibration_file_errors_name_the_file(tmp_path):
    path = tmp_path / "calibration.json"
    with pytest.raises(FileNotFoundError, match="calibration.json"):
        read_calibration(path)
    path.write_text('{"profiles": {"vga": ')  # truncated
    with pytest.raises(ValueError, match=r"calibration\.json is corrupt"):
        read_calibration(path)
    path.write_text('{"profiles": {"vga": {"constraints": {"vq": {"tau": NaN}}}}}')
    with pytest.raises(ValueError, match=r"calibration\.json is corrupt.*NaN"):
        read_calibration(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        read_calibration(path)
    # a non-finite result is refused before anything is written; the previous file stays
    write_calibration(path, {"ok": 1.0})
    with pytest.raises(ValueError, match="non-finite"):
        write_calibration(path, {"tau": math.nan})
    assert json.loads(path.read_text()) == {"ok": 1.0}
