"""Dream pictures and dream error: rendering, alignment of dreams with reality, the callback."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from callbacks.visualize import DreamVisualizer, play
from datamodules.replay_datamodule import ReplayDataModule
from dreamer import visuals
from dreamer.agent import Dreamer


def frames(n, value_of=lambda k: k * 10):
    """(n, 64, 64, 3) uint8 frames, frame k filled with value_of(k) plus a per-pixel pattern."""
    pattern = (np.arange(64 * 64 * 3).reshape(64, 64, 3) % 7).astype(np.uint8)
    return np.stack([np.full((64, 64, 3), value_of(k), np.uint8) + pattern for k in range(n)])


@pytest.fixture(scope="module")
def agent():
    torch.manual_seed(0)
    return Dreamer(size="tiny").eval()


@pytest.fixture(scope="module")
def played(agent):
    from datamodules.procgen import ProcgenVectorEnv

    env = ProcgenVectorEnv("coinrun", 3, "easy", num_levels=5, start_level=0, seed=3)
    try:
        return play(env, agent, 24)
    finally:
        env.close()


def test_render_rows_places_input_frames_exactly_and_labels_outside_them():
    real, pred = frames(5), frames(5, lambda k: 200 - k)
    scale = 3
    image = visuals.render_rows([("real", real), ("dream", pred)], [f"t={k}\nr=0" for k in range(5)], scale)
    assert image.dtype == np.uint8 and image.shape[2] == 3
    for col in range(5):
        for row, source in ((0, real), (1, pred)):
            ys, xs = visuals.frame_box(row, col, scale)
            assert np.array_equal(image[ys, xs][::scale, ::scale], source[col]), (row, col)
            assert np.array_equal(image[ys, xs], np.kron(source[col], np.ones((scale, scale, 1), np.uint8)))
    assert (image[: visuals.LABEL_H] < 255).any(), "column labels are drawn"


def test_wrapped_rows_keep_every_frame_and_label_each_block():
    real, pred = frames(7), frames(7, lambda k: 200 - k)
    image = visuals.render_rows([("real", real), ("dream", pred)], [f"t={k}" for k in range(7)], 2, wrap=3)
    size = 64 * 2 + visuals.GAP
    assert image.shape[:2] == (3 * (visuals.LABEL_H + 2 * size), visuals.MARGIN_W + 3 * size)
    for col in range(7):
        for row, source in ((0, real), (1, pred)):
            ys, xs = visuals.frame_box(row, col, 2, 2, 3)
            assert np.array_equal(image[ys, xs][::2, ::2], source[col]), (row, col)
    for block in range(3):
        top = block * (visuals.LABEL_H + 2 * size)
        assert (image[top : top + visuals.LABEL_H] < 255).any(), f"block {block} has column labels"
        assert (image[top + visuals.LABEL_H :, : visuals.MARGIN_W][: 2 * size] < 255).any(), "row names"


def test_a_fifteen_step_dream_picture_fits_a_preview_pane():
    real = frames(15)[None]
    dream = {"real": real, "pred": real.copy(), "reward": np.zeros((1, 15)), "value": np.zeros((1, 15)),
             "step": np.arange(5, 20)}
    assert visuals.dream_vs_reality(dream, scale=2).shape[1] <= 800  # was 2,014 px in one strip


def test_perfect_dream_has_zero_difference_row_and_zero_error_at_every_horizon():
    real = frames(6)[None]  # (1, 6, 64, 64, 3)
    picture = visuals.dream_vs_reality(
        {"real": real, "pred": real.copy(), "reward": np.zeros((1, 6)), "value": np.zeros((1, 6)),
         "step": np.arange(5, 11)}, lane=0, scale=1)
    for col in range(6):
        ys, xs = visuals.frame_box(2, col, 1, 3, visuals.WRAP)
        assert not picture[ys, xs].any(), "difference row of a perfect dream is black"
        ys, xs = visuals.frame_box(0, col, 1, 3, visuals.WRAP)
        assert np.array_equal(picture[ys, xs], real[0, col])
    errors = visuals.horizon_errors(real, real.copy(), frames(1, lambda k: 0)[0][None])
    assert np.all(errors["error"] == 0) and np.all(errors["psnr"] == visuals.PSNR_CAP)


def test_horizon_errors_against_hand_computed_baseline_and_masking():
    # real frame k is uniform k * 10 / 255; the last context frame is black: baseline MSE = (k*10/255)^2
    real = np.stack([np.full((4, 64, 64, 3), k * 10, np.uint8) for k in range(1, 5)], 1)  # (4 lanes, 4)
    pred = np.full_like(real, 20)
    last = np.zeros((4, 64, 64, 3), np.uint8)
    valid = np.ones((4, 4), bool)
    valid[0, 2:] = False  # lane 0 reset at horizon 3
    valid[:, 3] = False  # nobody reaches horizon 4
    e = visuals.horizon_errors(real, pred, last, valid)
    expected_baseline = np.array([(k * 10 / 255) ** 2 for k in range(1, 4)])
    np.testing.assert_allclose(e["baseline_error"][:3], expected_baseline)
    np.testing.assert_allclose(e["error"][:3], [((k * 10 - 20) / 255) ** 2 for k in range(1, 4)])
    np.testing.assert_allclose(e["psnr"][0], 10 * np.log10(1 / (10 / 255) ** 2))
    assert list(e["count"]) == [4, 4, 3, 0] and np.isnan(e["error"][3])
    # a lane's invalid steps do not count: corrupting them changes nothing
    pred[0, 2:] = 255
    np.testing.assert_allclose(visuals.horizon_errors(real, pred, last, valid)["error"][:3], e["error"][:3])


def test_open_loop_aligns_dreams_with_the_real_steps_and_actions(agent, played):
    obs, action, is_first = played["obs"], played["action"], played["is_first"]
    context, horizon = 4, 10
    dream = visuals.open_loop(agent, obs, action, is_first, context, horizon)
    assert dream["pred"].shape == (3, horizon, 64, 64, 3) and dream["pred"].dtype == np.uint8
    assert np.array_equal(dream["real"], obs[:, context : context + horizon])
    assert np.array_equal(dream["last"], obs[:, context - 1])
    # the dream of step context + k takes the action taken at step context + k - 1
    assert np.array_equal(dream["action"], action[:, context - 1 : context - 1 + horizon])
    assert list(dream["step"]) == list(range(context, context + horizon))
    for key in ("reward", "value", "cont"):
        assert dream[key].shape == (3, horizon) and np.isfinite(dream[key]).all()
    # the posterior after the context equals acting's posterior (same observation path)
    mask = is_first.copy()
    mask[:, 5] = True
    assert not visuals.open_loop(agent, obs, action, mask, context, horizon)["valid"][:, 1:].any()
    with pytest.raises(ValueError, match="exceeds the 24 real steps"):
        visuals.open_loop(agent, obs, action, is_first, 20, 10)
    own = visuals.open_loop(agent, obs[:1], action[:1], is_first[:1], context, 30, own_actions=True)
    assert own["pred"].shape == (1, 30, 64, 64, 3) and "real" not in own


def test_play_records_frames_actions_and_rewards_on_arrival(played):
    from datamodules.procgen import ProcgenVectorEnv

    twin = ProcgenVectorEnv("coinrun", 3, "easy", num_levels=5, start_level=0, seed=3)
    obs, _ = twin.reset()
    assert played["is_first"][:, 0].all() and played["value"].shape == (3, 24)
    for t in range(23):  # replaying the recorded actions reproduces the recorded frames
        assert np.array_equal(played["obs"][:, t], obs), t
        obs, reward, terminated, truncated, _ = twin.step(played["action"][:, t].astype(np.int64))
        np.testing.assert_array_equal(played["reward"][:, t + 1], reward)
        np.testing.assert_array_equal(played["is_first"][:, t + 1], terminated | truncated)
    twin.close()


def test_episode_trace_takes_the_reward_for_acting_at_each_step():
    played = {
        "value": np.arange(8, dtype=np.float32)[None],
        "reward": np.array([[0, 0, 1, 0, 5, 0, 0, 0]], np.float32),  # 5 = final reward, arrives with the reset
        "is_first": np.array([[1, 0, 0, 0, 1, 0, 0, 0]], bool),
    }
    trace = visuals.episode_trace(played)
    assert trace["complete"] and list(trace["value"]) == [0, 1, 2, 3]
    assert list(trace["reward"]) == [0, 1, 0, 5]


def test_gif_and_plots_are_real_pictures(tmp_path):
    real = frames(7)[None]
    dream = {"real": real, "pred": real[:, ::-1].copy(), "step": np.arange(3, 10)}
    gif = Image.open(visuals.save_gif(tmp_path / "d.gif", dream, scale=1))
    assert gif.n_frames == 7
    first = np.asarray(gif.convert("RGB"))
    for row in range(3):  # real, dream, |diff| named in the margin
        ys, _ = visuals.frame_box(row, 0, 1, 3)
        assert (first[ys, : visuals.MARGIN_W] < 128).any(), f"GIF row {row} is labelled"
    err = visuals.error_plot(visuals.horizon_errors(real, real[:, ::-1], real[:, 0]))
    trace = visuals.value_trace_plot(np.linspace(0, 1, 50), np.where(np.arange(50) == 10, 1.0, 0.0))
    for picture in (err, trace):
        assert picture.ndim == 3 and picture.shape[0] > 100 and picture.std() > 10


def test_decode_goal_returns_frames():
    from dreamer.goals import GoalDreamer

    agent = GoalDreamer(size="tiny").eval()
    goal = torch.randn(2, agent.world_model.rssm.deter)
    assert agent.decode_goal(goal).shape == (2, 64, 64, 3)


def test_visualizer_writes_every_picture_and_leaves_training_randomness_alone(agent, tmp_path):
    dm = ReplayDataModule(game="coinrun", num_envs=2, num_levels=5, batch_size=2, seq_len=8,
                          replay_capacity=256, test_num_envs=2)
    dm.setup("fit")
    trainer = SimpleNamespace(datamodule=dm, is_global_zero=True, default_root_dir=str(tmp_path),
                              loggers=[])
    callback = DreamVisualizer(context=3, horizon=6, gif_steps=8, lanes=2, trace_steps=40)
    torch.manual_seed(7)
    before = torch.get_rng_state()
    files = callback.visualize(trainer, agent)
    assert torch.equal(torch.get_rng_state(), before)
    assert set(files) == {"dream_vs_reality", "actor_dream", "dream_error", "value_trace", "dream_gif"}
    for path in files.values():
        assert path.is_file() and path.parent == tmp_path / "dreams"
    picture = np.asarray(Image.open(files["dream_vs_reality"]))
    assert picture.shape[:2] == (2 * (visuals.LABEL_H + 3 * 130), visuals.MARGIN_W + 5 * 130)  # 6 columns wrap at 5
    with pytest.raises(ValueError, match="horizon must be a positive integer"):
        DreamVisualizer(horizon=0)
