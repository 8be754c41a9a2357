"""Few-shot linear evaluation: the ridge solution equals scikit-learn's, and a digits model probes well.

The digits model is the session's `digits_run` (conftest): the README's first command.
"""

import re

import jax
import numpy as np
import pytest
from test_config import run_main

from mixer_jax import fewshot, weights


@pytest.mark.parametrize("n,d", [(60, 12), (15, 40)])  # Primal (N >= D) and dual (N < D) solves.
def test_ridge_equals_sklearn(n, d):
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)) * rng.uniform(0.5, 3, size=d) + rng.normal(size=d)
    y = 2.0 * np.eye(5)[rng.integers(0, 5, n)] - 1.0
    for l2_reg in (1e-2, 1.0, 2.0**10):
        w, b = fewshot.ridge_fit(x, y, l2_reg)
        ref = Ridge(alpha=l2_reg, fit_intercept=True, solver="cholesky").fit(x, y)
        np.testing.assert_allclose(w, ref.coef_.T, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(b, ref.intercept_, atol=1e-4, rtol=1e-4)


def test_probe_matches_sklearn_predictions():
    from sklearn.linear_model import Ridge

    rng = np.random.default_rng(1)
    centers = rng.normal(size=(4, 16)) * 3
    train_labels, test_labels = np.repeat(np.arange(4), 5), rng.integers(0, 4, 200)
    train_x = centers[train_labels] + rng.normal(size=(20, 16))
    test_x = centers[test_labels] + rng.normal(size=(200, 16))
    accuracy = fewshot.probe_accuracy(train_x, train_labels, test_x, test_labels, 4, l2_reg=8.0)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    ridge = Ridge(alpha=8.0).fit((train_x - mean) / std, 2.0 * np.eye(4)[train_labels] - 1)
    expected = np.mean(ridge.predict((test_x - mean) / std).argmax(-1) == test_labels)
    assert accuracy == pytest.approx(expected) and accuracy > 0.9


def test_ten_shot_probe_on_a_digits_model(digits_run, data_dir):
    workdir = digits_run.workdir
    flat = weights.read(workdir)
    model = weights.model_for(flat, "Ti/4")
    params = weights.convert(flat, model)
    evaluator = fewshot.Evaluator(
        "digits", image_size=16, data_dir=data_dir, shots=(1, 10), num_seeds=2, batch_size=256
    )
    results = evaluator(params, model)
    assert set(results) == {"fewshot/digits_1shot", "fewshot/digits_10shot"}
    assert results["fewshot/digits_10shot"] >= 0.90, results
    # The second call reuses the images already read; features of other params give other numbers.
    random_init = model.init(jax.random.key(1), np.zeros((1, 16, 16, 3), np.float32))["params"]
    random_params = weights.convert(weights.flatten(random_init), model)
    assert evaluator(random_params, model)["fewshot/digits_10shot"] < results["fewshot/digits_10shot"]
    # `stop` is asked before each batch of images: 200 train images (one batch of 256), then 360 test
    # images (two); a yes at the third question ends the call with no results.
    asked = []
    assert evaluator(params, model, stop=lambda: asked.append(True) or len(asked) == 3) is None and len(asked) == 3


def test_fewshot_command_line(digits_run, data_dir, capsys):
    workdir = digits_run.workdir
    code = fewshot.main(
        [
            f"--weights={workdir}",
            "--variant=Ti/4",
            "--dataset=digits",
            f"--data_dir={data_dir}",
            "--shots=5",
            "--num_seeds=1",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert re.fullmatch(r"digits_5shot: [\d.]+% \(mean of 1 draws\)\n", out)
    assert fewshot.main([f"--weights={workdir}", "--variant=B/16", "--dataset=digits"]) == 2
    assert "not a Mixer-B/16" in capsys.readouterr().err


def test_trainer_runs_fewshot_probes(data_dir, tmp_path):
    """config.fewshot: the trainer logs the probes at `every` steps and at the end, and the final
    numbers equal a standalone evaluation of the final checkpoint."""
    import json

    result = run_main(
        "--config=configs/digits.py",
        f"--workdir={tmp_path}",
        f"--config.input.data_dir={data_dir}",
        "--config.model.variant=Mu/4",
        "--config.total_steps=20",
        "--config.warmup_steps=5",
        "--config.log_every=10",
        "--config.eval_every=0",
        "--config.fewshot.datasets=digits",
        "--config.fewshot.every=10",
        "--config.fewshot.shots=2,5",
        "--config.fewshot.num_seeds=2",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"step 20  few-shot digits_2shot [\d.]+%  digits_5shot [\d.]+%", result.stderr)
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [row for row in map(json.loads, f) if "fewshot/digits_5shot" in row]
    assert [row["step"] for row in rows] == [10, 20]
    flat = weights.read(str(tmp_path))
    model = weights.model_for(flat, "Mu/4")
    expected = fewshot.evaluate(
        weights.convert(flat, model), model, "digits", data_dir=data_dir, shots=(2, 5), num_seeds=2
    )
    assert rows[-1]["fewshot/digits_5shot"] == pytest.approx(expected["fewshot/digits_5shot"], abs=1e-6)
    assert rows[-1]["fewshot/digits_2shot"] == pytest.approx(expected["fewshot/digits_2shot"], abs=1e-6)
