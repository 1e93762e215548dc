"""Brier uncertainty end to end: logged to TensorBoard by both LightningModules, reported by `calm eval`
(console and --json), and eval.num_samples passed through to CALM's estimator."""

from __future__ import annotations

import json
import math

from calm_lightning.cli import main
from calm_lightning.ui import display_metrics

INTERVAL_TAGS = {"val/brier1_se", "val/brier1_lo", "val/brier1_hi", "val/brierlm_lo", "val/brierlm_hi"}


def _eval(capsys, *argv):
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def _check_intervals(metrics: dict) -> None:
    ns = [n for n in range(1, 9) if f"val/brier{n}" in metrics]
    assert ns and all(f"val/brier{n}_se" in metrics for n in ns)
    for n in ns:
        b, se = metrics[f"val/brier{n}"], metrics[f"val/brier{n}_se"]
        assert math.isfinite(se) and se >= 0
        assert metrics[f"val/brier{n}_lo"] <= b <= metrics[f"val/brier{n}_hi"]
    assert 0 <= metrics["val/brierlm_lo"] <= metrics["val/brierlm"] <= metrics["val/brierlm_hi"]


def test_calm_eval_reports_intervals_and_num_samples(tiny_calm_run, capsys):
    rc, out, _ = _eval(capsys, "eval", tiny_calm_run.checkpoint, "--json")
    assert rc == 0
    result = json.loads(out)
    assert result["brier_num_samples"] == 16  # the default S
    _check_intervals(result["metrics"])
    rc, out, _ = _eval(capsys, "eval", tiny_calm_run.checkpoint, "eval.num_samples=2", "--json")
    assert rc == 0
    two = json.loads(out)
    assert two["brier_num_samples"] == 2 and two["metrics"]["val/brier1"] != result["metrics"]["val/brier1"]
    rc, out, _ = _eval(capsys, "eval", tiny_calm_run.checkpoint)
    assert rc == 0 and "±" in out and "brier1_se" not in out
    rc, _, err = _eval(capsys, "eval", tiny_calm_run.checkpoint, "eval.num_samples=1")
    assert rc == 2 and "eval.num_samples" in err


def test_ar_eval_reports_intervals(tiny_ar_run, capsys):
    rc, out, _ = _eval(capsys, "eval", tiny_ar_run.checkpoint, "--json")
    assert rc == 0
    metrics = json.loads(out)["metrics"]
    _check_intervals(metrics)
    assert {"val/brier1", "val/brierlm", "val/ce"} <= set(metrics)  # existing keys kept


def test_both_modules_log_intervals_to_tensorboard(tiny_calm_run, tiny_ar_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for run in (tiny_calm_run, tiny_ar_run):
        acc = EventAccumulator(str(run.run_dir))
        acc.Reload()
        assert INTERVAL_TAGS | {"val/brier1", "val/brierlm"} <= set(acc.Tags()["scalars"]), run.kind


def test_display_metrics_folds_intervals():
    shown = display_metrics(
        {
            "val/brier1": 0.04321,
            "val/brier1_se": 0.0021,
            "val/brier1_lo": 0.0391,
            "val/brier1_hi": 0.0473,
            "val/brierlm": 5.724,
            "val/brierlm_lo": 5.1,
            "val/brierlm_hi": 6.31,
            "val/brier2": 0.01,
            "val/brier2_se": float("nan"),
            "val/brier2_lo": float("nan"),
            "val/brier2_hi": float("nan"),
            "val/head_loss": 1.25,
        }
    )
    assert shown == {
        "val/brier1": "0.0432 ± 0.0021  [0.0391, 0.0473]",
        "val/brierlm": "5.72  [5.10, 6.31]",
        "val/brier2": "0.0100 ± n/a  [n/a, n/a]",
        "val/head_loss": 1.25,
    }
