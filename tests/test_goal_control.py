"""Goals that need control, on a toy world where position is the state: the hard goal sets leave out
what the goal-blind actor reaches, the goal reward peaks exactly at the goal, and the matcher's
reinforcement learning reaches goals the actor cannot."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from callbacks.dreams import DreamGeneration
from callbacks.goal_metrics import GoalEvaluation
from dreamer.goals import hard
from dreamer.goals.matcher import GoalMatcher
from dreamer.goals.model import GoalStateModel, first_match
from dreamer.goals.pursuit import Acting, GoalPursuit

P = 9  # positions 0..8 on a line; the state is the one-hot position


class LineWorld:
    """A world model stand-in: action a moves left (a % 3 == 0), right (1) or stays (2); the
    features and deter are the one-hot position, and nothing ever ends. ``imagine`` takes a
    policy or, as the RSSM, actions (H, N) to play open loop."""

    def __init__(self) -> None:
        self.rssm = self

    @staticmethod
    def state(pos: torch.Tensor) -> dict:
        return {"deter": F.one_hot(pos, P).float(), "stoch": torch.zeros(len(pos), 1, 1)}

    @staticmethod
    def features(state: dict) -> torch.Tensor:
        return state["deter"]

    def imagine(self, start, policy, horizon, keep_states=True):
        pos = start["deter"].argmax(-1)
        states, actions = [self.state(pos)], []
        for t in range(horizon):
            action = policy[t] if isinstance(policy, torch.Tensor) else policy(self.features(states[-1]))
            move = torch.tensor([-1, 1, 0])[action % 3]
            pos = (pos + move).clamp(0, P - 1)
            states.append(self.state(pos))
            actions.append(action)
        stacked = {k: torch.stack([s[k] for s in states]) for k in states[0]}
        return stacked, stacked["deter"], torch.stack(actions)

    @staticmethod
    def state_from_features(feat: torch.Tensor) -> dict:
        return {"deter": feat, "stoch": torch.zeros(len(feat), 1, 1)}

    def continue_prob(self, feat: torch.Tensor) -> torch.Tensor:
        return torch.ones(feat.shape[:-1])


def goal_model() -> GoalStateModel:
    gm = GoalStateModel(goal_dim=P, threshold=0.7)
    gm.mean.zero_(), gm.var.fill_(1.0), gm.stats_seen.fill_(True)  # one-hot states as they are
    return gm


def always_right(feat: torch.Tensor) -> torch.Tensor:
    return torch.ones(feat.shape[:-1], dtype=torch.long)


def reached(agent, start, goal, policy, steps):
    """``dreamer.goals.hard.reached`` in ``agent``'s world and goal model."""
    return hard.reached(agent.world_model, agent.goal_model, start, goal, policy, steps)


def toy_agent(matcher=None):
    return SimpleNamespace(world_model=LineWorld(), goal_model=goal_model(), goal_matcher=matcher,
                           actor_critic=SimpleNamespace(sample=always_right))


def test_the_goal_reward_is_one_exactly_at_the_goal_and_lower_elsewhere():
    torch.manual_seed(0)
    gm = GoalStateModel(goal_dim=16)
    gm.update_statistics({"deter": torch.randn(4, 32, 16) * 3 + 1})
    goal = torch.randn(5, 16)
    assert torch.allclose(gm.similarity(goal, {"deter": goal}), torch.ones(5))
    for nearby in (goal * 1.1, goal + 0.05 * torch.randn(5, 16), torch.randn(5, 16)):
        assert (gm.similarity(goal, {"deter": nearby}) < 1).all()


def test_the_hard_goal_set_keeps_exactly_the_goals_the_actor_does_not_reach():
    agent = toy_agent()
    left = torch.tensor([6, 5, 4, 3, 2, 1, 0, 0, 0, 0])  # a replayed trajectory moving left
    right = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 8, 8])  # one moving right, as the actor does
    post = {k: torch.stack([LineWorld.state(left)[k], LineWorld.state(right)[k]]) for k in ("deter", "stoch")}
    is_first = torch.zeros(2, 10, dtype=torch.bool)
    start, goal, kept, path = hard.hard_pairs(agent, post, is_first, 2, 100)
    assert path is None  # no replayed actions given
    start_pos, goal_pos = start["deter"].argmax(-1), goal.argmax(-1)
    # open pairs: left 6->4 .. 2->0 and 1->0 (6 pairs; 0->0 already matches), right 1->3 .. 6->8 and
    # 7->8 (7 pairs); the actor reaches every right goal and none of the left ones
    assert sorted(zip(start_pos.tolist(), goal_pos.tolist())) == [(1, 0), (2, 0), (3, 1), (4, 2), (5, 3), (6, 4)]
    assert kept == pytest.approx(6 / 13)
    assert not reached(agent, start, goal, always_right, 2).any()


def test_the_reach_reward_pays_the_first_match_and_ends_the_dream_there():
    similarity = torch.tensor([[0.2, 0.9, 0.1], [0.8, 0.95, 0.3], [0.9, 0.1, 0.69], [0.75, 0.7, 0.5]])  # (H=4, N=3)
    reward, open_ = first_match(similarity, 0.7)
    assert reward.T.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    assert open_.T.tolist() == [[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]]


def test_an_unknown_matcher_reward_is_refused_in_one_line():
    with pytest.raises(ValueError, match="unknown goal matcher reward 'distance'; allowed: similarity, reach"):
        GoalMatcher(feat_dim=P, goal_dim=P, reward="distance")


@pytest.mark.parametrize("reward", ["similarity", "reach"])
def test_reinforcement_learning_in_imagination_reaches_goals_the_actor_cannot(reward):
    torch.manual_seed(0)
    matcher = GoalMatcher(feat_dim=P, goal_dim=P, units=64, layers=1, lr=3e-3, horizon=8, entropy=1e-2,
                          reward=reward)
    agent = toy_agent(matcher)
    optimizer = matcher.configure_optimizers()
    start_pos = torch.full((256,), 6)
    goal_pos = torch.randint(0, 4, (256,))  # 3 to 6 steps to the left
    start, goal = LineWorld.state(start_pos), F.one_hot(goal_pos, P).float()

    def success(policy):
        return reached(agent, start, goal, policy, 8).float().mean().item()

    before = success(matcher.toward(goal, agent.goal_model.space))
    for _ in range(100):
        train_start = LineWorld.state(torch.randint(0, P, (256,)))
        train_goal = F.one_hot(torch.randint(0, P, (256,)), P).float()
        loss, metrics = matcher.rl_loss(agent.world_model, agent.goal_model, train_start, train_goal)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        matcher.ac.update_slow_critic()
    after = success(matcher.toward(goal, agent.goal_model.space))
    assert success(always_right) == 0.0
    assert before < 0.5 and after >= 0.9, (before, after)
    # reach pays at most 1 per dream (its first match); similarity pays on every step near the goal
    ret = float(metrics["goal_matcher/rl_return"])
    assert ret <= 1.0 if reward == "reach" else ret > 1.0, ret
    assert set(metrics) >= {"goal_matcher/rl_actor", "goal_matcher/rl_critic", "goal_matcher/rl_return"}


def test_dream_generation_trains_only_the_matcher_and_reports_the_hard_sets():
    from test_goals import tiny_model_after_a_batch

    from callbacks.dreams import DreamGeneration

    model, batch = tiny_model_after_a_batch()
    model.goal_model.update_statistics(model.last_post)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generation = DreamGeneration(num_dreams=16, horizon=6, matcher_updates=2, matcher_batch=32,
                                 rl_goals=32, rl_goal_steps=4)
    metrics = generation.generate(model, model.last_post, batch["is_first"])
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"goal_matcher"}
    assert {"goal_matcher/rl_actor", "goal_matcher/rl_return", "goal_matcher/loss"} <= set(metrics)
    hard = GoalEvaluation(eval_goals=16, hard_offsets=(2, 4, 999)).evaluate_hard(model, model.last_post, batch["is_first"])
    assert not any("k999" in key for key in hard)  # longer than the sequences: skipped
    for k in (2, 4):
        assert 0 < hard[f"goal_hard/k{k}_kept"] <= 1  # an untrained model's actor misses most real goals
        assert all(0 <= hard[f"goal_hard/k{k}_{name}"] <= 1 for name in ("matcher", "actor", "random"))
        assert hard[f"goal_hard/k{k}_lift"] == pytest.approx(hard[f"goal_hard/k{k}_matcher"] - hard[f"goal_hard/k{k}_actor"])


def test_a_checkpoint_of_the_matcher_without_a_critic_restores():
    from dreamer.checkpoints import restore_agent
    from dreamer.goals import GoalDreamer

    torch.manual_seed(0)
    saved = GoalDreamer(size="tiny")
    state = {k.replace("goal_matcher.ac.actor.", "goal_matcher.policy."): v for k, v in saved.state_dict().items()
             if not k.startswith("goal_matcher.ac.") or k.startswith("goal_matcher.ac.actor.")}
    # a run with the dream callbacks (their state in the checkpoint): it restores into a GoalDreamer
    agent = restore_agent({"hyper_parameters": dict(saved.hparams), "state_dict": state,
                           "callbacks": {"DreamGeneration": {}}})
    for name, value in saved.goal_matcher.ac.actor.state_dict().items():
        assert torch.equal(agent.goal_matcher.ac.actor.state_dict()[name], value)


def replay_goal_model(strategy: str, goals: tuple[int, ...], paths: tuple[list[int], ...] | None = None) -> GoalStateModel:
    """Replayed pairs from position 4 to each of ``goals``, in that order, with the actions
    ``paths`` (3 each) that led there (unknown without)."""
    gm = GoalStateModel(goal_dim=P, strategy=strategy, threshold=0.7, rollouts=4, offset=3)
    gm.mean.zero_(), gm.var.fill_(1.0), gm.stats_seen.fill_(True)
    for i, goal in enumerate(goals):
        gm.bank_start[gm.bank_count] = LineWorld.state(torch.tensor([4]))["deter"][0]
        gm.bank_goal[gm.bank_count] = LineWorld.state(torch.tensor([goal]))["deter"][0]
        if paths is not None:
            gm.bank_path[gm.bank_count] = torch.tensor(paths[i])
        gm.bank_count += 1
    return gm


LEFT3, RIGHT3, STAY3 = [0, 0, 0], [1, 1, 1], [2, 2, 2]


def test_the_control_strategy_proposes_only_goals_the_replayed_actions_reach_from_here():
    world, actor = LineWorld(), SimpleNamespace(sample=always_right)
    here = LineWorld.state(torch.tensor([4]))
    # 0: recorded with three steps left, which from 4 end at 1 (the dream, or the level, differs);
    # 1: three steps left, reachable; 7: the actor's own way
    goals, paths = (0, 1, 7), (LEFT3, LEFT3, RIGHT3)
    proposed, usable = replay_goal_model("hard", goals, paths).propose_where(here, world, actor)
    assert usable.tolist() == [True] and proposed.argmax(-1).item() in (0, 1)  # both unreached by the actor
    proposed, usable = replay_goal_model("control", goals, paths).propose_where(here, world, actor)
    assert usable.tolist() == [True] and proposed.argmax(-1).tolist() == [1]
    # no candidate both missed by the actor and reached by its recorded actions: none to score
    _, usable = replay_goal_model("control", (0, 7), (LEFT3, RIGHT3)).propose_where(here, world, actor)
    assert usable.tolist() == [False]
    # recorded without actions (a bank filled before it kept them): never controllable
    _, usable = replay_goal_model("control", (1,)).propose_where(here, world, actor)
    assert usable.tolist() == [False]
    _, usable = replay_goal_model("hard", (1,)).propose_where(here, world, actor)
    assert usable.tolist() == [True]


def test_a_hard_goal_must_be_missed_by_every_one_of_actor_tries_dreams():
    from dreamer.goals import GoalDreamer

    calls = []

    def right_once_then_left(feat):  # the first 3-step dream goes right, every later one left
        calls.append(1)
        return torch.full(feat.shape[:-1], 1 if len(calls) <= 3 else 0)

    here = LineWorld.state(torch.tensor([4]))
    for tries, is_hard in ((1, True), (2, False)):
        calls.clear()
        gm = replay_goal_model("control", (1,), (LEFT3,))
        gm.hp.actor_tries = tries
        _, usable = gm.propose_where(here, LineWorld(), SimpleNamespace(sample=right_once_then_left))
        assert usable.tolist() == [is_hard] and len(calls) == 3 * tries
    assert GoalDreamer(size="tiny", goals={"actor_tries": 3}).goal_model.hp.actor_tries == 3
    with pytest.raises(ValueError, match="actor_tries"):
        GoalDreamer(size="tiny", goals={"actor_tries": 0})


def test_the_goal_bank_keeps_the_actions_that_led_from_each_start_to_its_goal():
    actions = torch.tensor([[0, 0, 2, 1, 1, 0, 2, 0, 1, 1], [1, 1, 1, 2, 0, 0, 0, 1, 2, 2]])  # (B, T)
    world, pos = LineWorld(), [torch.full((2,), 5)]
    for t in range(actions.shape[1] - 1):  # action[t] is taken at step t
        pos.append((pos[-1] + torch.tensor([-1, 1, 0])[actions[:, t]]).clamp(0, P - 1))
    post = LineWorld.state(torch.stack(pos, 1).flatten())
    post = {k: v.reshape(2, actions.shape[1], *v.shape[1:]) for k, v in post.items()}
    is_first = torch.zeros(2, 10, dtype=torch.bool)
    is_first[1, 4] = True  # lane 1 restarts at step 4: pairs that cross it are not stored
    gm = replay_goal_model("control", ())
    gm.observe(post, is_first, actions, seed=0)
    n = int(gm.bank_count)
    assert n == 7 + 4  # lane 0: starts 0..6; lane 1: starts 0 and 4..6 (1..3 cross the restart)
    stored = sorted(zip(gm.bank_start[:n].argmax(-1).tolist(), gm.bank_path[:n].tolist()))
    expected = sorted((int(pos[t][b]), actions[b, t:t + 3].tolist())
                      for b, starts in ((0, range(7)), (1, (0, 4, 5, 6))) for t in starts)
    assert stored == expected
    # independent truth: each stored path, played from its start, ends at its stored goal
    states, _, _ = world.imagine(LineWorld.state(gm.bank_start[:n].argmax(-1)), gm.bank_path[:n].T.contiguous(), 3)
    assert torch.equal(states["deter"][-1].argmax(-1), gm.bank_goal[:n].argmax(-1))


def test_a_checkpoint_written_before_the_bank_kept_actions_restores_with_them_unknown():
    from dreamer.checkpoints import restore_agent
    from dreamer.goals import GoalDreamer

    torch.manual_seed(0)
    saved = GoalDreamer(size="tiny")
    state = {k: v for k, v in saved.state_dict().items() if k != "goal_model.bank_path"}
    state["goal_model.bank_count"] = torch.tensor(5)
    agent = restore_agent({"hyper_parameters": dict(saved.hparams), "state_dict": state,
                           "callbacks": {"DreamGeneration": {}}})
    assert int(agent.goal_model.bank_count) == 5 and (agent.goal_model.bank_path == -1).all()


def test_the_hard_strategy_proposes_the_replayed_goal_the_actor_does_not_reach():
    world, actor = LineWorld(), SimpleNamespace(sample=always_right)
    chosen = {}
    for strategy in ("replay", "hard"):
        # three steps right of position 4 (the actor's way), then three left
        gm = replay_goal_model(strategy, (7, 1))
        proposed, usable = gm.propose_where(LineWorld.state(torch.tensor([4, 4])), world, actor)
        chosen[strategy] = proposed.argmax(-1).tolist()
        assert usable.tolist() == [True, True]
    assert chosen["hard"] == [1, 1]  # the actor, always moving right, reaches 7 but never 1
    assert chosen["replay"] == [7, 7]  # the plain replay strategy takes the first most similar


def test_where_the_actor_reaches_every_candidate_goal_pursuit_scores_nothing():
    from dreamer.goals.pursuit import Acting, GoalPursuit

    world, actor = LineWorld(), SimpleNamespace(sample=always_right)
    gm = replay_goal_model("hard", (6, 7))  # both on the actor's way
    proposed, usable = gm.propose_where(LineWorld.state(torch.tensor([4])), world, actor)
    assert usable.tolist() == [False] and proposed.argmax(-1).tolist() == [6]
    pursuit = GoalPursuit(Acting(goal_steps=8, track=True))
    post = LineWorld.state(torch.tensor([4]))
    track = None
    for _ in range(3):  # the lane steers toward candidate 6 unscored, asking again each step
        track = pursuit.step(post, torch.tensor([False]), torch.zeros(1), track, gm, world, actor)
        assert track.active.tolist() == [False]
    assert pursuit.metrics["fit"].steps == 0
    # a candidate off the actor's way: the lane pursues it
    gm = replay_goal_model("hard", (6, 1))
    track = pursuit.step(post, torch.tensor([False]), torch.zeros(1), track, gm, world, actor)
    assert track.active.tolist() == [True] and track.goal.argmax(-1).tolist() == [1]


def test_the_hard_goal_set_is_empty_where_every_pair_crosses_an_episode_start():
    agent = toy_agent()
    post = {k: v.unsqueeze(0) for k, v in LineWorld.state(torch.tensor([3, 4, 5, 6, 7])).items()}
    is_first = torch.tensor([[True, False, True, False, True]])
    start, goal, kept, _ = hard.hard_pairs(agent, post, is_first, 2, 10)
    assert len(goal) == 0 and len(start["deter"]) == 0 and kept is None


def test_the_matchers_rl_can_take_real_hard_pairs_and_only_those():
    """``rl_real_fraction``: that fraction of the RL goals are real pairs of the batch the actor
    misses (on the line world: the left-moving trajectory's), none with 0."""
    from callbacks.dreams import DreamGeneration

    agent = toy_agent()
    left = torch.tensor([6, 5, 4, 3, 2, 1, 0, 0, 0, 0])
    right = torch.tensor([1, 2, 3, 4, 5, 6, 7, 8, 8, 8])
    post = {k: torch.stack([LineWorld.state(left)[k], LineWorld.state(right)[k]]) for k in ("deter", "stoch")}
    is_first = torch.zeros(2, 10, dtype=torch.bool)
    hard = {(1, 0), (2, 0), (3, 1), (4, 2), (5, 3), (6, 4)}
    torch.manual_seed(0)
    start, goal = DreamGeneration(rl_goals=8, rl_real_fraction=0.5, rl_goal_steps=2).real_rl_goals(agent, post, is_first)
    pairs = list(zip(start["deter"].argmax(-1).tolist(), goal.argmax(-1).tolist()))
    assert len(pairs) == 4 and set(pairs) <= hard
    start, goal = DreamGeneration(rl_goals=100, rl_real_fraction=1.0, rl_goal_steps=2).real_rl_goals(agent, post, is_first)
    assert set(zip(start["deter"].argmax(-1).tolist(), goal.argmax(-1).tolist())) == hard  # all there are
    start, goal = DreamGeneration(rl_goals=8).real_rl_goals(agent, post, is_first)
    assert len(goal) == 0 and start["deter"].shape == (0, P)
    with pytest.raises(ValueError, match=r"rl_real_fraction must be in \[0, 1\], got 1.5"):
        DreamGeneration(rl_real_fraction=1.5)


def test_dream_generation_with_real_rl_goals_trains_on_them_and_fills_up_with_dream_goals(monkeypatch):
    from test_goals import tiny_model_after_a_batch

    from callbacks.dreams import DreamGeneration

    model, batch = tiny_model_after_a_batch()
    model.goal_model.update_statistics(model.last_post)
    real_goals = model.goal_model.goal_of(model.last_post).reshape(-1, model.goal_model.space.dim)
    seen, rl_loss = [], model.goal_matcher.rl_loss

    def recording(world_model, goal_model, start, goal):
        seen.append(goal)
        return rl_loss(world_model, goal_model, start, goal)

    monkeypatch.setattr(model.goal_matcher, "rl_loss", recording)
    generation = DreamGeneration(num_dreams=16, horizon=6, matcher_updates=2, matcher_batch=32,
                                 rl_goals=32, rl_goal_steps=4, rl_real_fraction=0.25)
    drawn, real_rl_goals = [], generation.real_rl_goals
    monkeypatch.setattr(generation, "real_rl_goals", lambda *args: drawn.append(real_rl_goals(*args)) or drawn[-1])
    torch.manual_seed(0)
    generation.generate(model, model.last_post, batch["is_first"])
    ((_, real_goal),) = drawn  # once per phase
    assert 0 < len(real_goal) <= 8  # an untrained actor misses real goals
    assert len(seen) == 2 and all(len(goal) == 32 for goal in seen)
    for goal in seen:  # the phase's real pairs first, the same in every matcher update
        torch.testing.assert_close(goal[: len(real_goal)], seen[0][: len(real_goal)])
        is_real = torch.cdist(goal, real_goals, compute_mode="donot_use_mm_for_euclid_dist").min(-1).values < 1e-5
        assert is_real[: len(real_goal)].all()


# --------------------------------------------------------------------------- planning in dreams
def uniform_logits(feat, here, goal):
    return torch.full((*feat.shape[:-1], 15), -math.log(15.0))


def right_logits(feat):
    return F.one_hot(torch.ones(feat.shape[:-1], dtype=torch.long), 15).float().clamp(min=1e-12).log()


def test_planning_takes_the_first_action_of_the_dream_that_matches_the_goal_soonest():
    torch.manual_seed(0)
    agent = SimpleNamespace(world_model=LineWorld(), goal_model=goal_model(),
                            goal_matcher=SimpleNamespace(policy_logits=uniform_logits),
                            actor_critic=SimpleNamespace(policy_logits=right_logits))
    n = 32  # lanes at position 4: the first half toward 2 (two steps left), the rest toward 5 (one right)
    here = LineWorld.state(torch.full((2 * n,), 4))
    goal = agent.goal_model.goal_of(LineWorld.state(torch.tensor([2] * n + [5] * n)))
    pursuit = GoalPursuit()
    acting = Acting(mix_weight=1.0, plan=128, plan_horizon=4)  # the uniform matcher proposes; the actor has no say
    move = pursuit.planned(agent, here, goal, acting) % 3  # 0 left, 1 right, 2 stay
    # dreams such as (right, left, left, left) also end at 2, and (stay, right) at 5: only the
    # soonest match fixes the first step
    assert (move[:n] == 0).all() and (move[n:] == 1).all()

    acting = Acting(mix_weight=1.0, plan=1, plan_horizon=4)  # one dream: a sample of the uniform matcher
    move = pursuit.planned(agent, here, goal, acting) % 3
    assert (move[:n] == 0).float().mean() < 0.7 and (move[n:] == 1).float().mean() < 0.7

    acting = Acting(mix_weight=1e-3, plan=128, plan_horizon=4)  # the actor's dreams all go right: 2 out of reach
    move = pursuit.planned(agent, here, goal, acting) % 3
    assert (move[n:] == 1).all() and (move[:n] == 1).float().mean() > 0.8


def test_planning_takes_the_first_action_of_the_dream_that_matches_soonest():
    # four dreams of 4 steps from position 4 toward 2: action 3 reaches it at once in one dream and
    # never in the other; action 5 reaches it at step 2 in both
    positions = torch.tensor([[2, 2, 2, 2], [5, 6, 7, 8], [3, 2, 2, 2], [3, 2, 2, 2]]).T  # (H, P)

    class Scripted(LineWorld):
        def imagine(self, start, policy, horizon, keep_states=True):
            pos = torch.cat([torch.full((1, 4), 4), positions])  # (H + 1, P)
            states = {k: v.reshape(horizon + 1, 4, *v.shape[1:]) for k, v in self.state(pos.flatten()).items()}
            actions = torch.tensor([3, 3, 5, 5]).expand(horizon, 4)
            return states, states["deter"], actions

    agent = SimpleNamespace(world_model=Scripted(), goal_model=goal_model(),
                            goal_matcher=SimpleNamespace(policy_logits=uniform_logits),
                            actor_critic=SimpleNamespace(policy_logits=right_logits))
    here, goal = LineWorld.state(torch.tensor([4])), agent.goal_model.goal_of(LineWorld.state(torch.tensor([2])))
    assert GoalPursuit().planned(agent, here, goal, Acting(mix_weight=1.0, plan=4, plan_horizon=4)).tolist() == [3]  # the soonest single match (score 4)


def test_acting_is_one_value_replaced_whole_and_off_by_default():
    pursuit = GoalPursuit()
    assert pursuit.acting == Acting() and not pursuit.on
    pursuit.acting = Acting(mix_weight=1.0, plan=16, greedy=True)
    assert pursuit.on and pursuit.acting.goal_steps == 32
    with pytest.raises(AttributeError):  # frozen: a change is a new Acting, never a flipped field
        pursuit.acting.track = True
    assert Acting(track=True).on and not Acting(plan=4).on


def test_the_hard_sets_can_measure_the_matcher_choosing_in_dreams_and_leave_acting_as_it_was():
    torch.manual_seed(0)
    uniform = lambda feat: torch.randint(0, 15, feat.shape[:-1])  # noqa: E731
    agent = SimpleNamespace(world_model=LineWorld(), goal_model=goal_model(), goals=GoalPursuit(),
                            hparams=SimpleNamespace(num_actions=15),
                            goal_matcher=SimpleNamespace(policy_logits=uniform_logits,
                                                         toward=lambda goal, space: uniform),
                            actor_critic=SimpleNamespace(policy_logits=right_logits, sample=always_right))
    n = 64  # from position 4 to 2 in 2 steps: only (left, left), 1 in 9 for a uniform policy
    start = LineWorld.state(torch.full((n,), 4))
    goal = agent.goal_model.goal_of(LineWorld.state(torch.full((n,), 2)))
    measured = GoalEvaluation(hard_plan=64, hard_plan_horizon=4)._successes(agent, start, goal, 2, "goal_hard/k2")
    assert measured["goal_hard/k2_planned"] == 1.0  # at 4 and again at 3 some dream goes left at once
    assert measured["goal_hard/k2_actor"] == 0.0 and measured["goal_hard/k2_matcher"] < 0.3
    assert agent.goals.acting == Acting()  # acting as it was
    control = GoalEvaluation(hard_plan=64, hard_plan_horizon=4, hard_plan_weight=1e-3)  # the actor's dreams
    assert control._successes(agent, start, goal, 2, "goal_hard/k2")["goal_hard/k2_planned"] == 0.0  # all go right
    without = GoalEvaluation()._successes(agent, start, goal, 2, "goal_hard/k2")
    assert "goal_hard/k2_planned" not in without
    with pytest.raises(ValueError, match=r"GoalEvaluation hard_plan must be >= 0 \(0: off\), got -1"):
        GoalEvaluation(hard_plan=-1)
    with pytest.raises(ValueError, match=r"GoalEvaluation hard_plan_weight must be in \(0, 1\], got 0"):
        GoalEvaluation(hard_plan=4, hard_plan_weight=0)
    with pytest.raises(ValueError, match="GoalEvaluation hard_plan_horizon must be >= 1, got 0"):
        GoalEvaluation(hard_plan=4, hard_plan_horizon=0)


def test_the_matcher_learns_the_actions_of_its_best_dreams_and_then_reaches_what_the_actor_cannot():
    torch.manual_seed(0)
    matcher = GoalMatcher(feat_dim=P, goal_dim=P, units=64, layers=1, lr=3e-3)
    agent = SimpleNamespace(world_model=LineWorld(), goal_model=goal_model(), goals=GoalPursuit(),
                            hparams=SimpleNamespace(num_actions=15),
                            goal_matcher=matcher, actor_critic=SimpleNamespace(policy_logits=right_logits))
    n = 64  # from position 4 to 2 in 2 steps: only (left, left), 1 in 9 for a uniform policy
    start = LineWorld.state(torch.full((n,), 4))
    goal = agent.goal_model.goal_of(LineWorld.state(torch.full((n,), 2)))
    generation = DreamGeneration(plan_distill=32, rl_goal_steps=2)

    def success():
        return reached(agent, start, goal, matcher.toward(goal, agent.goal_model.space), 2).float().mean().item()

    before = success()
    optimizer = matcher.configure_optimizers()
    for _ in range(80):
        loss, agreement = generation.distill_plans(agent, start, goal)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = success()
    # the best dreams all step left first: the target is the 5 left actions, nothing else
    _, agreement = generation.distill_plans(agent, start, goal)
    left = matcher.policy_logits(start["deter"], goal_model().goal_of(start), goal).exp()[:, 0::3].sum(-1)
    assert before < 0.3 and after > 0.9 and agreement == 1.0 and (left > 0.95).all(), (before, after, agreement)
    assert not reached(agent, start, goal, always_right, 2).any()
    assert agent.goals.acting == Acting()  # acting as it was
    for kwargs, message in (({"plan_distill": -1}, r"plan_distill must be >= 0 \(0: off\), got -1"),
                            ({"plan_distill_goals": 0}, "plan_distill_goals must be >= 1, got 0"),
                            ({"plan_distill": 4, "plan_distill_weight": 0}, "plan_distill_weight must be > 0, got 0")):
        with pytest.raises(ValueError, match=message):
            DreamGeneration(**kwargs)


def test_dream_generation_with_plan_distillation_trains_only_the_matcher_and_reports_agreement():
    from test_goals import tiny_model_after_a_batch

    model, batch = tiny_model_after_a_batch()
    model.goal_model.update_statistics(model.last_post)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    generation = DreamGeneration(num_dreams=16, horizon=6, matcher_updates=2, matcher_batch=32,
                                 rl_goals=32, rl_goal_steps=4, plan_distill=4, plan_distill_goals=8)
    metrics = generation.generate(model, model.last_post, batch["is_first"])
    changed = {k.split(".")[0] for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {"goal_matcher"}
    assert 0.0 <= metrics["goal_matcher/plan_agreement"] <= 1.0
    assert model.goals.acting == Acting(model.hparams.goals["steps"])
    assert "goal_matcher/plan_agreement" not in DreamGeneration(num_dreams=16, matcher_batch=32, rl_goals=8).generate(
        model, model.last_post, batch["is_first"])


def test_proposals_and_evaluation_share_one_definition_of_hard_and_controllable_goals():
    """One default for the actor dreams a hard goal must survive, and a controllable goal's replayed
    actions imagined as often in proposals as in evaluation (once each per try)."""
    from dreamer.goals import GoalKnobs

    assert GoalStateModel(goal_dim=P).hp.actor_tries == GoalKnobs().actor_tries == hard.ACTOR_TRIES == 2

    class Counting(LineWorld):
        open_loop = 0

        def imagine(self, start, policy, horizon, keep_states=True):
            Counting.open_loop += isinstance(policy, torch.Tensor)
            return super().imagine(start, policy, horizon, keep_states)

    gm = replay_goal_model("control", (1,), (LEFT3,))
    gm.hp.actor_tries = 3
    _, usable = gm.propose_where(LineWorld.state(torch.tensor([4])), Counting(), SimpleNamespace(sample=always_right))
    assert usable.tolist() == [True] and Counting.open_loop == 3
    Counting.open_loop = 0
    agent = toy_agent()
    agent.world_model, agent.goal_model.hp.actor_tries = Counting(), 3
    agent.hparams = SimpleNamespace(num_actions=15)
    agent.goal_matcher = SimpleNamespace(toward=lambda goal, space: always_right)
    left = torch.tensor([6, 5, 4, 3, 2, 1, 0, 0, 0, 0])
    post = {k: v.unsqueeze(0) for k, v in LineWorld.state(left).items()}
    action = torch.zeros(1, 10, dtype=torch.long)  # left all the way: the replayed actions reach every goal
    metrics = GoalEvaluation(hard_offsets=(3,)).evaluate_hard(agent, post, torch.zeros(1, 10, dtype=torch.bool), action)
    assert metrics["goal_control/k3_kept"] == metrics["goal_hard/k3_kept"] == 1.0
    assert Counting.open_loop == 1 + 3  # the replayed actions as a policy on the hard set, then once per try
