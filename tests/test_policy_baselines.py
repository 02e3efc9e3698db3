"""The baselines a learning agent must beat, and the comparison of trained checkpoints with them."""

import math

import pytest
import torch

from dreamer.agent import Dreamer
from benchmarks import policy_baselines as pb


def test_mean_standard_error_and_margin_by_hand():
    mean, se = pb.mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert pb.margin((3.0, 0.3), (1.0, 0.4)) == pytest.approx(4.0)  # 2 / hypot(0.3, 0.4)


def test_constant_policy_repeats_its_action():
    action, state = pb.ConstantPolicy(7).act(torch.zeros(5, 64, 64, 3, dtype=torch.uint8), torch.ones(5, dtype=torch.bool))
    assert action.tolist() == [7] * 5 and state is None


def _checkpoint(path, game="chaser", with_levels=True):
    torch.manual_seed(0)
    agent = Dreamer(size="tiny")
    ckpt = {"hyper_parameters": dict(agent.hparams), "state_dict": agent.state_dict(), "dreamer": {"game": game}}
    if with_levels:
        ckpt["datamodule_hyper_parameters"] = {"game": game, "num_levels": 5, "start_level": 0,
                                               "distribution_mode": "easy"}
    torch.save(ckpt, path)
    return path


def test_checkpoints_play_the_baselines_levels_and_get_margins(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path / "a.ckpt")
    pb.main(["--checkpoint", str(ckpt), "--episodes", "2"])
    out = capsys.readouterr().out
    assert "chaser, easy, levels [0, 5), 2 episodes" in out
    assert "<- best constant" in out and "trained" in out and "margin over random" in out


def test_checkpoint_comparison_refuses_mixed_or_unlabelled_checkpoints(tmp_path, capsys):
    a, b = _checkpoint(tmp_path / "a.ckpt"), _checkpoint(tmp_path / "b.ckpt", game="coinrun")
    with pytest.raises(SystemExit):
        pb.main(["--checkpoint", str(a), str(b)])
    assert "different games or levels" in capsys.readouterr().err
    c = _checkpoint(tmp_path / "c.ckpt", with_levels=False)
    with pytest.raises(SystemExit):
        pb.main(["--checkpoint", str(c)])
    assert "does not say which game" in capsys.readouterr().err
