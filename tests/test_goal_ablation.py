"""scripts/goal_ablation.py: the table it prints, and (slow) both arms end to end on the smoke config."""

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import goal_ablation  # noqa: E402


def test_the_table_gives_means_with_standard_errors_over_seeds():
    assert goal_ablation.mean_se([1.0, 2.0, 4.0]) == f"2.333+-{math.sqrt((1.78 + 0.11 + 2.78) / 6):.3f}"
    assert goal_ablation.mean_se([0.5, float("nan")]) == "0.500"
    assert goal_ablation.mean_se([]) == "-"
    results = {
        "plain": [{"val/train_levels/return": 1.0}, {"val/train_levels/return": 3.0}],
        "dreams": [{"val/train_levels/return": 2.0, "goal_hard/k8_lift": 0.25,
                    "val/unseen_levels/hard_matcher/step_success": 0.5}],
    }
    lines = goal_ablation.table(results).splitlines()
    row = lambda label: next(line for line in lines if line.startswith(label)).split()  # noqa: E731
    assert row("return (train)")[-2:] == ["2.000+-1.000", "2.000"]
    assert row("hard k=8: lift (dreams)")[-2:] == ["-", "0.250"]
    assert row("hard, matcher acts: step success (unseen)")[-2:] == ["-", "0.500"]


@pytest.mark.slow
def test_both_arms_run_end_to_end_and_the_dreams_arm_reports_hard_goals(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    text = goal_ablation.run(["--config", str(goal_ablation.ROOT / "configs" / "smoke.yaml"),
                              "--max-env-steps", "384", "--seeds", "0", "--data.game", "bigfish",
                              "--trainer.logger.init_args.tracking_uri", f"sqlite:///{tmp_path}/mlflow.db"])
    assert "hard, matcher acts: step success (train)" in text
    dreams = [line.split()[-1] for line in text.splitlines() if line.startswith("hard, matcher acts")]
    assert any(cell != "-" for cell in dreams)
