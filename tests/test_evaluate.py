"""evaluate(): accuracy over queries, DPGN's ci95, engines see identical episodes."""
import numpy as np
import pytest
import torch

from qgnn_deploy.config import preset_config
from qgnn_deploy.data import episode_batches
from qgnn_deploy.errors import InputError
from qgnn_deploy.evaluate import confidence_interval, evaluate, model_predict
from qgnn_deploy.models import build_model

CFG = preset_config("tiny")


def _oracle(episodes, seed, correct_per_task=5):
    """A predictor that replays the same episode stream and answers ``correct_per_task``
    queries right (the others deliberately wrong)."""
    stream = episode_batches(CFG, episodes, seed, "test")

    def predict(images, support):
        _, _, query = next(stream)
        assert query.shape[0] == images.shape[0]
        answer = query.clone()
        answer[:, correct_per_task:] = (answer[:, correct_per_task:] + 1) % CFG.way
        return torch.nn.functional.one_hot(answer, CFG.way).float()
    return predict


def test_perfect_and_partial_predictors():
    r = evaluate(_oracle(25, 4), CFG, episodes=25, seed=4, progress=False)
    assert r["accuracy"] == 1.0 and r["ci95"] == 0.0 and r["episodes"] == 25 and r["queries"] == 125
    r = evaluate(_oracle(25, 4, correct_per_task=3), CFG, episodes=25, seed=4, progress=False)
    assert r["accuracy"] == pytest.approx(0.6) and r["ci95"] == pytest.approx(0.0)


def test_constant_predictor_is_exactly_chance():
    """Ties go to class 0 and every task has exactly one query of class 0."""
    r = evaluate(lambda i, s: torch.zeros(i.shape[0], 5, 5), CFG, episodes=30, seed=1,
                 progress=False, return_logits=True)
    assert r["accuracy"] == pytest.approx(0.2)
    assert r["logits"].shape == (30, 5, 5) and r["query_labels"].shape == (30, 5)
    assert r["predictions"].eq(0).all()


def test_ci95_convention():
    per = np.array([1.0, 0.6, 0.8, 0.4, 1.0, 0.2])
    assert confidence_interval(per) == pytest.approx(1.96 * per.std() / np.sqrt(6))


def test_same_episodes_for_two_engines_and_bad_shapes():
    torch.manual_seed(0)
    model = build_model(CFG).eval()
    a = evaluate(model_predict(model), CFG, episodes=12, seed=2, progress=False, return_logits=True,
                 tasks_per_batch=5)
    b = evaluate(model_predict(model), CFG, episodes=12, seed=2, progress=False, return_logits=True,
                 tasks_per_batch=12)
    assert torch.allclose(a["logits"], b["logits"], atol=1e-5)
    assert torch.equal(a["query_labels"], b["query_labels"])
    with pytest.raises(InputError, match="logits of shape"):
        evaluate(lambda i, s: torch.zeros(i.shape[0], 5), CFG, episodes=3, progress=False)
