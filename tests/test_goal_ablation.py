"""experiments/goal_ablation.py: the table it prints, finished arms reused and interrupted ones resumed,
and (slow) both arms end to end on the smoke config."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
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


class FakeCLI:
    """What ``run_arm`` reads of a finished ``cli.main``: the trainer's validation metrics."""

    def __init__(self, args):
        self.args = args
        self.model = SimpleNamespace(to=lambda device: None)
        self.datamodule = None
        self.trainer = SimpleNamespace(validate=lambda *a, **k: None, callbacks=[],
                                       strategy=SimpleNamespace(root_device="cpu"),
                                       callback_metrics={"val/train_levels/return": torch.tensor(2.5)})


def refused(capsys, call, message: str) -> None:
    """``call()`` ends the script with status 2 and the one line ``error: ...message...``."""
    with pytest.raises(SystemExit) as stop:
        call()
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_finished_arms_are_reused_and_interrupted_ones_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    calls = []
    monkeypatch.setattr(goal_ablation, "main", lambda args: calls.append(args) or FakeCLI(args))
    arm = ("plain", ["configs/smoke.yaml"], 0, 384, [])
    assert goal_ablation.run_arm(*arm) == {"val/train_levels/return": 2.5}
    assert "--ckpt_path" not in calls[0] and calls[0][calls[0].index("--trainer.default_root_dir") + 1] == \
        str(Path("runs/ablation/plain-seed0"))
    record = tmp_path / "runs" / "ablation" / "plain-seed0" / "ablation.json"
    assert json.loads(record.read_text())["metrics"] == {"val/train_levels/return": 2.5}

    # finished: measured again without training
    assert goal_ablation.run_arm(*arm) == {"val/train_levels/return": 2.5} and len(calls) == 1
    # the same directory with another setting is refused, naming what differs
    refused(capsys, lambda: goal_ablation.run_arm("plain", ["configs/smoke.yaml"], 0, 768, []),
            "another max_env_steps")

    # interrupted (no measurements yet): resumed from its last checkpoint
    record.write_text(json.dumps({"setting": json.loads(record.read_text())["setting"]}))
    refused(capsys, lambda: goal_ablation.run_arm(*arm), "no checkpoint to resume; remove that directory")
    (record.parent / "checkpoints").mkdir()
    (record.parent / "checkpoints" / "last.ckpt").write_bytes(b"")
    goal_ablation.run_arm(*arm)
    assert calls[-1][-2:] == ["--ckpt_path", "last"] and "metrics" in json.loads(record.read_text())

    # a directory this script did not start is left alone
    (tmp_path / "runs" / "ablation" / "dreams-seed0").mkdir()
    refused(capsys, lambda: goal_ablation.run_arm("dreams", ["configs/smoke.yaml"], 0, 384, []),
            "was not started by this script")


def test_each_arm_trains_with_its_own_dream_configs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    calls, pursued = [], []
    monkeypatch.setattr(goal_ablation, "main", lambda args: calls.append(args) or FakeCLI(args))
    monkeypatch.setattr(goal_ablation, "real_hard_goal_pursuit", lambda cli: pursued.append(cli) or {})
    for arm in ("plain", "dreams", "search"):
        goal_ablation.run_arm(arm, ["configs/smoke.yaml"], 0, 384, [])
    configs = [[Path(args[i + 1]).name for i, a in enumerate(args) if a == "--config"] for args in calls]
    assert configs == [["smoke.yaml"], ["smoke.yaml", "dreams.yaml"], ["smoke.yaml", "dreams_search.yaml"]]
    assert [Path(cli.args[cli.args.index("--trainer.default_root_dir") + 1]).name for cli in pursued] == \
        ["dreams-seed0", "search-seed0"]  # hard goals in the real game: the arms with a matcher
    assert goal_ablation.parse(["--arms", "plain", "search"])[0].arms == ["plain", "search"]
    with pytest.raises(SystemExit):
        goal_ablation.parse(["--arms", "planning"])
    assert "invalid choice: 'planning'" in capsys.readouterr().err


def test_results_directory_carries_finished_arms_to_another_machine(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(goal_ablation, "main", lambda args: calls.append(args) or FakeCLI(args))
    results = tmp_path / "results"
    arm = ("plain", ["configs/smoke.yaml"], 0, 384, [])
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()

    monkeypatch.chdir(first)
    assert goal_ablation.run_arm(*arm, results=results) == {"val/train_levels/return": 2.5}
    kept = json.loads((results / "plain-seed0.json").read_text())
    assert kept["setting"]["max_env_steps"] == 384 and kept["metrics"] == {"val/train_levels/return": 2.5}
    assert set(kept["measured"]) == {"date", "commit", "cpu", "torch"} and kept["measured"]["torch"] == torch.__version__
    try:  # the code the process started from; "unknown" outside a git checkout
        head = subprocess.run(["git", "-C", str(goal_ablation.ROOT), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        head = ""
    assert goal_ablation.STARTED_AT.removesuffix("+changes") == head
    assert kept["measured"]["commit"] == (goal_ablation.STARTED_AT or "unknown")

    # a fresh machine (no runs/ directory) reuses the kept measurements without training
    monkeypatch.chdir(second)
    assert goal_ablation.run_arm(*arm, results=results) == {"val/train_levels/return": 2.5}
    assert len(calls) == 1 and not (second / "runs").exists()
    # another setting is refused, naming what differs
    refused(capsys, lambda: goal_ablation.run_arm("plain", ["configs/smoke.yaml"], 0, 384, ["--x", "1"],
                                                  results=results), "another extra")
    # an arm finished before --results was given is copied there when the script runs again
    monkeypatch.chdir(first)
    (results / "plain-seed0.json").unlink()
    assert goal_ablation.run_arm(*arm, results=results) == {"val/train_levels/return": 2.5} and len(calls) == 1
    assert json.loads((results / "plain-seed0.json").read_text())["metrics"] == {"val/train_levels/return": 2.5}

    # a file that is not a record, and --results naming a file, are refused in one line
    (results / "plain-seed0.json").write_text("{not json")
    refused(capsys, lambda: goal_ablation.run_arm(*arm, results=results), "is not a measurement record")
    refused(capsys, lambda: goal_ablation.parse(["--results", str(results / "plain-seed0.json")]), "is a file")
    refused(capsys, lambda: goal_ablation.parse(["--max-env-steps", "0"]), "must be >= 1")
