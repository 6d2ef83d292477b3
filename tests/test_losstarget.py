"""Layer 2: a loss target picks the bits (the salience planner measuring held-out loss), on a
tiny random model: the built cache meets the target on the text it was measured on, a looser
target costs fewer bits, and the embeddings and head are candidates too."""

import random

import pytest

from sli.offline.calibration import CalibrationConfig
from sli.processor import UniversalSLIProcessor

from conftest import make_tiny_model


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    rng = random.Random(1)
    p = tmp_path_factory.mktemp("losstext") / "t.txt"
    # some structure to predict: words repeat in short runs
    words = []
    while len(words) < 3000:
        w = f"word{rng.randrange(300)}"
        words += [w] * rng.randrange(1, 4)
    p.write_text(" ".join(words))
    return p


def test_target_loss_is_met_on_the_text_it_measured_with_the_fewest_bits(tmp_path, tiny_root, text):
    path = make_tiny_model(tiny_root, "llama", layers=2, seed=3)
    cal = CalibrationConfig(text=str(text), samples=8, seqlen=32, holdout_tokens=128)
    plans = {}
    for target in (0.5, 4.0):
        p = UniversalSLIProcessor.for_target(path, target_loss=target, calibration=cal, cache_dir=tmp_path, progress=False)
        sp = p.salience
        assert sp.loss <= target and sp.steps  # measured on the held-out slice while planning
        assert sp.plan.calibration == cal and sp.plan.planned["target_loss"] == target
        assert "model.embed_tokens.weight" in sp.choices  # the embeddings were a candidate, measured apart
        assert set(sp.row_losses["model.embed_tokens.weight"]) <= {"int4-g32", "int4-g64", "int4-g128", "int8", "keep"}
        built = p.heldout_loss()  # the cache as written (sequential GPTQ), on the same held-out text
        assert built <= target, (target, built, sp.loss)
        plans[target] = sp
        p.close()
    assert plans[4.0].bits_all < plans[0.5].bits_all
    assert not (tmp_path / "plans").exists() or not any((tmp_path / "plans").rglob("*.rec"))  # candidates cleaned up


def test_targets_are_checked(tmp_path, tiny_root, text):
    from sli.offline.salience import plan_by_salience
    from sli.offline.sources import open_source

    src = open_source(make_tiny_model(tiny_root, "llama", layers=2, seed=3))
    with pytest.raises(ValueError, match="give target_bits or target_loss"):
        plan_by_salience(src, target_bits=4, target_loss=2, work_dir=tmp_path)
    with pytest.raises(ValueError, match="must be positive"):
        plan_by_salience(src, target_loss=-1, work_dir=tmp_path, calibration=CalibrationConfig(text=str(text), samples=8, seqlen=32, holdout_tokens=128))
    with pytest.raises(ValueError, match="at least two windows"):
        plan_by_salience(src, target_loss=2, work_dir=tmp_path, calibration=CalibrationConfig(text=str(text), samples=8, seqlen=32, holdout_tokens=40))
