"""Goal spaces: the fixed ones read the right part of a state, the learned inverse-dynamics one
keeps what the actions move and drops what moves by itself, and restores with its optimiser."""

import re
import torch
import torch.nn.functional as F
import pytest

from dreamer.goals import GoalDreamer
from dreamer.goals.space import GoalSpace, InverseDynamicsSpace, make_goal_space
from dreamer.goals.model import GoalStateModel

C = 5  # classes per latent


def ring_world(batch: int, length: int, seed: int, delay: int = 0):
    """Posteriors (B, T, ...) of a world with two categorical latents of ``C`` classes: the agent's
    position on a ring, moved by the action (0 left, 1 stay, 2 right) ``delay`` steps after the
    next one, and a light that cycles one step each frame whatever the agent does. Returns (post,
    actions (B, T), is_first (B, T))."""
    g = torch.Generator().manual_seed(seed)
    action = torch.randint(0, 3, (batch, length), generator=g)
    pos = torch.zeros(batch, length, dtype=torch.long)
    light = torch.zeros(batch, length, dtype=torch.long)
    pos[:, 0] = torch.randint(0, C, (batch,), generator=g)
    light[:, 0] = torch.randint(0, C, (batch,), generator=g)
    for t in range(1, length):  # action[t - 1 - delay] leads to step t
        move = action[:, t - 1 - delay] - 1 if t - 1 - delay >= 0 else 0
        pos[:, t] = (pos[:, t - 1] + move) % C
        light[:, t] = (light[:, t - 1] + 1) % C
    stoch = F.one_hot(torch.stack([pos, light], -1), C).float()  # (B, T, 2, C)
    post = {"deter": torch.randn(batch, length, 4, generator=g), "stoch": stoch, "logits": torch.zeros_like(stoch)}
    is_first = torch.zeros(batch, length, dtype=torch.bool)
    is_first[:, 0] = True
    return post, action, is_first


def state_of(pos: int, light: int) -> dict[str, torch.Tensor]:
    stoch = F.one_hot(torch.tensor([[pos, light]]), C).float()  # (1, 2, C)
    return {"deter": torch.zeros(1, 4), "stoch": stoch, "logits": torch.zeros_like(stoch)}


def trained_goal_model(kind: str, delay: int = 0) -> GoalStateModel:
    torch.manual_seed(0)
    space = make_goal_space(kind, deter=4, latent=2 * C, num_actions=3, dim=8, units=64, steps=4)
    gm = GoalStateModel(4, space=space)
    for step in range(400):
        post, action, is_first = ring_world(32, 16, seed=step, delay=delay)
        gm.observe(post, is_first, action, seed=step)
    return gm


def test_fixed_spaces_read_deter_or_the_latent_from_states_and_features_alike():
    post, _, _ = ring_world(2, 3, seed=0)
    feat = torch.cat([post["deter"], post["stoch"].flatten(-2)], -1)
    deter, stoch = GoalSpace("deter", 4, 2 * C), GoalSpace("stoch", 4, 2 * C)
    assert deter.dim == 4 and stoch.dim == 2 * C
    assert torch.equal(deter.of_state(post), post["deter"]) and torch.equal(deter.of_features(feat), post["deter"])
    assert torch.equal(stoch.of_state(post), post["stoch"].flatten(-2))
    assert torch.equal(stoch.of_features(feat), post["stoch"].flatten(-2))
    assert deter.learn(post, torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.bool)) == {}
    with pytest.raises(ValueError, match="unknown goal space 'pixels'; allowed: deter, stoch, inverse, multistep"):
        GoalSpace("pixels", 4, 2 * C)


def test_the_inverse_dynamics_space_keeps_what_actions_move_and_drops_what_moves_by_itself():
    gm = trained_goal_model("inverse")
    post, action, is_first = ring_world(64, 16, seed=10_000)  # held out
    metrics = gm.space.learn(post, action, is_first)
    assert metrics["goal_space/inverse_accuracy"] > 0.95  # the action is known from the move
    same_place = gm.similarity(gm.goal_of(state_of(2, 0)), state_of(2, 3))
    other_place = gm.similarity(gm.goal_of(state_of(2, 0)), state_of(4, 0))
    assert same_place > 0.95 and other_place < 0.5, (same_place, other_place)

    raw = trained_goal_model("stoch")  # the frame's latent: the light counts as much as the place
    assert raw.similarity(raw.goal_of(state_of(2, 0)), state_of(2, 3)) < 0.7
    assert not raw.matched(raw.goal_of(state_of(2, 0)), state_of(2, 3))


def first_action_accuracy(gm: GoalStateModel, post, action, k: int) -> float:
    """How often the space's head names the action at t from the goal vectors at t and t + k."""
    z = gm.goal_of(post)  # (B, T, dim)
    return (gm.space.action_logits(z[:, :-k], z[:, k:]).argmax(-1) == action[:, :-k]).float().mean().item()


def test_the_multistep_space_learns_an_action_whose_effect_shows_a_step_late():
    # the action moves the agent one step late: one step later nothing tells which it was (chance
    # 1/3); two steps later the move is the sum of two actions, whose first is named at best 5/9 of
    # the time (sums -2 and +2 name it, -1 and +1 halve the choice, 0 leaves all three)
    one, multi = trained_goal_model("inverse", delay=1), trained_goal_model("multistep", delay=1)
    post, action, is_first = ring_world(256, 16, seed=10_000, delay=1)  # held out
    post = {k: v[:, 2:] for k, v in post.items()}  # from where every step's move has an action behind it
    action = action[:, 2:]
    assert first_action_accuracy(one, post, action, 1) < 0.40
    assert 0.50 < first_action_accuracy(multi, post, action, 2) < 5 / 9 + 0.03
    assert multi.space.kind == "multistep" and multi.space.steps == 4
    same_place = multi.similarity(multi.goal_of(state_of(2, 0)), state_of(2, 3))
    other_place = multi.similarity(multi.goal_of(state_of(2, 0)), state_of(4, 0))
    assert same_place > 0.95 and other_place < 0.5, (same_place, other_place)  # the light dropped
    one_place = one.similarity(one.goal_of(state_of(2, 0)), state_of(4, 0))
    assert one_place > other_place  # the one-step space tells places apart less well
    with pytest.raises(ValueError, match="multistep goal space needs goals 2 or more steps ahead"):
        make_goal_space("multistep", 4, 2 * C, 3, steps=1)


def test_the_learned_space_and_its_optimiser_restore_from_a_state_dict():
    gm = trained_goal_model("inverse")
    fresh = GoalStateModel(4, space=InverseDynamicsSpace(4, 2 * C, 3, dim=8, units=64))
    fresh.load_state_dict(gm.state_dict())
    post, action, is_first = ring_world(32, 16, seed=5)
    a, b = gm.space.learn(post, action, is_first), fresh.space.learn(post, action, is_first)
    assert a["goal_space/inverse_loss"] == b["goal_space/inverse_loss"]
    for p, q in zip(gm.space.parameters(), fresh.space.parameters()):
        assert torch.equal(p, q)  # the same Adam step: its moments came back too


def test_a_dreamer_with_each_goal_space_sizes_its_matcher_to_the_goals():
    for space, dim in (("deter", 64), ("stoch", 128), ("inverse", 16), ("multistep", 16)):
        model = GoalDreamer(size="tiny", goals={"space": space, "space_dim": 16})
        assert model.goal_model.space.dim == dim
        assert model.goal_model.bank_goal.shape[-1] == (64 if space == "deter" else 128)  # sources
        feat = torch.randn(3, model.world_model.rssm.feat_dim)
        goal = torch.randn(3, dim)
        logits = model.goal_matcher.policy_logits(feat, model.goal_model.space.of_features(feat), goal)
        assert logits.shape == (3, 15)


def test_the_goal_space_comparison_reads_a_run_and_prints_every_space(smoke_run, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
    import goal_spaces

    cwd, _ = smoke_run
    ckpt = str(cwd / "runs" / "coinrun-tiny-seed0" / "checkpoints" / "last.ckpt")
    text = goal_spaces.run([ckpt, "--updates", "2", "--space-steps", "3", "--eval-batches", "2",
                            "--batch-size", "4", "--seq-len", "16", "--offsets", "4", "8",
                            "--dream-plan", "2", "--dream-plan-horizon", "2", "--plan-distill", "2",
                            "--plan-distill-goals", "8"])
    rows = [line.split() for line in text.splitlines()[1:]]
    assert [(r[0], r[1], r[2]) for r in rows] == [(s, c, k) for s in ("deter", "stoch", "inverse", "multistep")
                                                  for c in ("hard", "control") for k in ("4", "8")]
    hard = [r for r in rows if r[1] == "hard" and r[3] != "-"]  # sets with goals in them
    assert hard and all(0.0 <= float(r[6]) <= 1.0 for r in hard)  # the replayed actions' success
    assert all(0.0 <= float(r[9]) <= 1.0 for r in hard)  # the matcher choosing in 2 dreams
    learned = ("inverse", "multistep")
    assert all(r[-1] == "-" for r in rows if r[0] not in learned)  # only the learned spaces have an accuracy
    assert all(0.0 <= float(r[-1]) <= 1.0 for r in rows if r[0] in learned)
    agreement = re.findall(r"deter seed 0: \d+ s, last phase's plan agreement (\d\.\d+)", capsys.readouterr().err)
    assert len(agreement) == 1 and 0.0 <= float(agreement[0]) <= 1.0
    refused = [(["--offsets", "32"], "--offsets must lie in [1, --seq-len - 1] = [1, 31], got [32]"),  # seq-len 32
               (["--rl-real-fraction", "2"], "--rl-real-fraction must lie in [0, 1], got 2.0"),
               (["--real-strategy", "value"], "--real-strategy: invalid choice: 'value' (choose from"),
               (["--real-goal-steps", "0"], "--real-goal-steps must be >= 1, got 0"),
               (["--real-plan", "-1"], "--real-plan must be >= 0, got -1"),
               (["--real-plan-horizon", "0"], "--real-plan-horizon must be >= 1, got 0"),
               (["--real-weight", "0"], "--real-weight must lie in (0, 1], got 0.0"),
               (["--dream-plan", "-1"], "--dream-plan must be >= 0, got -1"),
               (["--dream-plan-horizon", "0"], "--dream-plan-horizon must be >= 1, got 0"),
               (["--dream-plan-weight", "1.5"], "--dream-plan-weight must lie in (0, 1], got 1.5"),
               (["--plan-distill", "-1"], "--plan-distill must be >= 0, got -1"),
               (["--plan-distill-goals", "0"], "--plan-distill-goals must be >= 1, got 0")]
    for argv, message in refused:
        with pytest.raises(SystemExit):
            goal_spaces.run([ckpt, *argv])
        assert message in capsys.readouterr().err, argv


@pytest.mark.slow
def test_the_goal_space_comparison_pursues_hard_goals_in_the_real_game(smoke_run):
    # about 3 minutes on 2 cores with the smoke fixture: an untrained agent's coinrun episodes are long
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
    import goal_spaces

    cwd, _ = smoke_run
    ckpt = str(cwd / "runs" / "coinrun-tiny-seed0" / "checkpoints" / "last.ckpt")
    text = goal_spaces.run([ckpt, "--spaces", "deter", "inverse", "--updates", "2", "--space-steps", "3",
                            "--eval-batches", "1", "--batch-size", "4", "--seq-len", "16", "--offsets", "4",
                            "--real-episodes", "1", "--real-strategy", "control", "--real-goal-steps", "4",
                            "--real-plan", "2", "--real-plan-horizon", "3"])
    real = text.split("\n\n", 1)[1]
    assert "control goals in the real game, train levels" in real and "real game, unseen levels" in real
    assert "actor acting / matcher (w = 1) choosing in 2 dreams of 3 steps" in real
    lines = [line.split() for line in real.splitlines() if line.split() and line.split()[0] in ("deter", "inverse")]
    assert len(lines) == 4 and all(len(line) == 1 + 5 * 3 and line[2] == "/" for line in lines)
    step_success = [float(line[c]) for line in lines for c in (1, 3)]  # the actor's and the matcher's
    assert all(0.0 <= v <= 1.0 for v in step_success)
    reach = [line[c] for line in lines for c in (10, 12)]  # steps to reach: a goal is dropped after 4 steps
    assert all(v == "-" or 1.0 <= float(v) <= 4.0 for v in reach), reach
    returns = [float(line[c]) for line in lines for c in (13, 15)]  # one coinrun episode (0 or 10) per env, 4 envs
    assert all(v in (0.0, 2.5, 5.0, 7.5, 10.0) for v in returns), returns
