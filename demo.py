"""Web demo: watch a trained agent play a Procgen level beside what it imagines.

    python demo.py runs/<name>/checkpoints/last.ckpt            # http://127.0.0.1:7860
    python demo.py --host 0.0.0.0 --port 8000 CKPT               # reachable from other machines
    python demo.py --share CKPT                                   # also a public gradio.live link

Pick a game and a level (training or unseen), step or auto-play, and see the real frame, a
filmstrip of the imagined future from the current state, the value estimate over the episode,
and, with goals shown, the active goal decoded to an image with its similarity to the state.
Checkpoints are read with ``torch.load(weights_only=True)``: a file can hold tensors and plain
containers only, never code.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from datamodules.collector import Rollout
from datamodules.games import SANITY_GAMES
from datamodules.procgen import GAMES, ProcgenConfig, unseen_levels, unseen_mode, vector_env
from dreamer import visuals
from dreamer.agent import Dreamer
from dreamer.checkpoints import CheckpointError, read_checkpoint, restore_agent

SPLITS = ("training", "unseen")
DREAM_STEPS = 8


class DemoError(Exception):
    """A problem the user can fix (wrong file, bad level); its message says what and how."""


@dataclass
class LoadedAgent:
    """A Dreamer restored from a checkpoint and the training setup it came from."""

    agent: Dreamer
    path: str
    game: str
    levels: ProcgenConfig
    dreams_on: bool


def load_agent(path: str | os.PathLike) -> LoadedAgent:
    """Restore a Dreamer from a Lightning checkpoint written by ``cli.py fit``."""
    try:
        ckpt = read_checkpoint(path)
        agent = restore_agent(ckpt, path)
    except CheckpointError as e:
        raise DemoError(str(e)) from None
    data = ckpt.get("datamodule_hyper_parameters") or {}
    game = (ckpt.get("dreamer") or {}).get("game") or data.get("game") or "coinrun"
    levels = ProcgenConfig(game=game, num_envs=1,
                           distribution_mode=data.get("distribution_mode", "easy"),
                           num_levels=int(data.get("num_levels", 200)),
                           start_level=int(data.get("start_level", 0)))
    callbacks = " ".join(ckpt.get("callbacks", {}))
    dreams_on = has_goals(agent) and ("DreamGeneration" in callbacks or agent.goals.acting.track)
    return LoadedAgent(agent, str(Path(path).expanduser()), game, levels, dreams_on)


def has_goals(agent) -> bool:
    """Whether ``agent`` pursues goals (the goal framework's ``GoalDreamer``; a plain Dreamer does not)."""
    return hasattr(agent, "goals")


def level_seed(levels: ProcgenConfig, split: str, index: int) -> int:
    """The procgen level seed of level ``index`` in the training or unseen range of a run."""
    if split not in SPLITS:
        raise DemoError(f"levels must be one of {', '.join(SPLITS)}, got {split!r}")
    if index < 0:
        raise DemoError(f"level index must be >= 0, got {index}")
    if split == "training":
        if levels.num_levels == 0:
            return index
        return levels.start_level + index % levels.num_levels
    start, count = unseen_levels(levels)
    return start + index % count if count else index  # exploration: any of hard mode's levels


@dataclass
class DemoSession:
    """One episode played by a loaded agent, one step at a time, and what it imagines."""

    loaded: LoadedAgent
    game: str = ""
    split: str = "training"
    index: int = 0
    show_goals: bool = False
    seed: int = 0
    rollout: Any = None
    values: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    similarities: list[float] = field(default_factory=list)
    episode_return: float = 0.0
    done: bool = False

    def start(self, game: str, split: str, index: int, show_goals: bool) -> None:
        """Start a fresh episode on level ``index`` of the training or unseen levels of ``game``."""
        if game not in GAMES + SANITY_GAMES:
            raise DemoError(f"unknown game {game!r}; allowed: {', '.join(GAMES + SANITY_GAMES)}")
        index = int(index)
        self.seed = level_seed(self.loaded.levels, split, index)
        mode = self.loaded.levels.distribution_mode
        mode = unseen_mode(mode) if split == "unseen" else mode
        if self.env is not None:
            self.env.close()
        num_levels, start_level = (0, 0) if mode == "exploration" else (1, self.seed)  # its one level
        self.rollout = Rollout(vector_env(game, 1, mode, num_levels, start_level, seed=self.seed))
        self.game, self.split, self.index, self.show_goals = game, split, index, show_goals
        self.rollout.reset()
        self.done, self.episode_return = False, 0.0
        self.values, self.rewards, self.similarities = [], [], []
        self._observe()

    @property
    def env(self) -> Any:
        """The one-lane env the episode is played on (None before ``start``)."""
        return self.rollout.env if self.rollout is not None else None

    @property
    def obs(self) -> np.ndarray:
        return self.rollout.obs

    @property
    def state(self) -> Any:
        return self.rollout.state

    @property
    def action(self) -> np.ndarray:
        """(1,) the action the agent takes at the next step."""
        return self.rollout.action

    def _observe(self) -> None:
        agent = self.loaded.agent
        if has_goals(agent):  # the goal framework's acting, tracking goals or not
            agent.goals.acting = replace(agent.goals.acting, track=self.show_goals)
        with torch.no_grad():
            self.rollout.act(agent)
            post, track = self.state.post, getattr(self.state, "goals", None)
            feat = agent.world_model.rssm.features(post)
            self.values.append(float(agent.actor_critic.value(feat)[0]))
            if track is not None:
                self.similarities.append(float(agent.goal_model.similarity(track.goal, post)[0]))

    def step(self) -> None:
        """Act once; a finished episode starts again on the same level."""
        if self.done:
            return self.start(self.game, self.split, self.index, self.show_goals)
        t = self.rollout.step()
        self.rewards.append(float(t.reward[0]))
        self.episode_return += float(t.reward[0])
        # at an episode's end procgen has already reset: the frame is the level's first again
        self.done = bool(t.terminated[0] or t.truncated[0])
        self._observe()

    # ------------------------------------------------------------- what the page shows
    def frame(self, scale: int = 4) -> np.ndarray:
        return self.obs[0].repeat(scale, 0).repeat(scale, 1)

    def filmstrip(self) -> np.ndarray:
        """The actor's imagined next ``DREAM_STEPS`` frames from the current state."""
        agent = self.loaded.agent
        post = self.state.post
        with torch.no_grad():
            _, feat, _ = agent.world_model.rssm.imagine(post, agent.actor_critic.sample, DREAM_STEPS, keep_states=False)
            feat = feat[1:, 0]  # (H, F)
            frames = visuals.decode(agent, feat)
            reward = agent.world_model.reward(feat).cpu().numpy()
            value = agent.actor_critic.value(feat).cpu().numpy()
        labels = [f"+{k + 1}\nr={r:+.2f}\nv={v:+.2f}" for k, (r, v) in enumerate(zip(reward, value))]
        return visuals.render_rows([("dream", frames)], labels, scale=2)

    def value_plot(self) -> np.ndarray:
        rewards = np.zeros(len(self.values), np.float32)
        rewards[: len(self.rewards)] = self.rewards[: len(self.values)]
        return visuals.value_trace_plot(np.array(self.values), rewards, "value estimate this episode")

    def goal(self) -> tuple[np.ndarray | None, str]:
        if not has_goals(self.loaded.agent):
            return None, "no goals: this agent is plain DreamerV3 (train with configs/dreams.yaml for goals)"
        track = self.state.goals
        if not self.show_goals or track is None:
            return None, "goals off (tick 'show goals')"
        image = self.loaded.agent.decode_goal(track.goal)[0]
        sim = self.similarities[-1]
        thr = self.loaded.agent.goal_model.hp.threshold
        word = "matched" if sim >= thr else "not yet matched"
        return image.repeat(4, 0).repeat(4, 1), f"goal similarity {sim:.3f} ({word}; threshold {thr})"

    def summary(self) -> str:
        note = ""
        if self.game != self.loaded.game:
            note = f" **The model was trained on {self.loaded.game}: its dreams of {self.game} mean little.**"
        end = " Episode over: the next step starts it again." if self.done else ""
        return (f"{self.game}, {self.split} level {self.index} (level seed {self.seed}), "
                f"step {len(self.rewards)}, return {self.episode_return:g}, "
                f"value {self.values[-1]:+.3f}.{end}{note}")


# ------------------------------------------------------------------ the page
def build_app(default_ckpt: str | None = None):
    """The Gradio Blocks app (not launched)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    def views(session: DemoSession | None):
        if session is None:
            return None, None, None, None, "", "No checkpoint loaded."
        goal_image, goal_text = session.goal()
        return (session.frame(), session.filmstrip(), session.value_plot(), goal_image, goal_text,
                session.summary())

    def load(path, show_goals):
        try:
            loaded = load_agent(path.strip())
            session = DemoSession(loaded)
            session.start(loaded.game, "training", 0, show_goals or loaded.dreams_on)
        except DemoError as e:
            return (None, gr.update(), gr.update(), f"**Could not load:** {e}",
                    *views(None)[:5], "")
        params = sum(p.numel() for p in loaded.agent.parameters())
        status = (f"Loaded `{loaded.path}`: {loaded.agent.hparams.size} model "
                  f"({params / 1e6:.2f}M parameters) trained on {loaded.game} "
                  f"({loaded.levels.num_levels} {loaded.levels.distribution_mode} levels from "
                  f"{loaded.levels.start_level}).")
        return (session, gr.update(value=loaded.game), gr.update(value=session.show_goals), status,
                *views(session))

    def restart(session, game, split, index, show_goals):
        if session is None:
            return (session, *views(None))
        try:
            session.start(game, split, int(index or 0), bool(show_goals))
        except DemoError as e:
            return (session, *views(session)[:5], f"**{e}**")
        return (session, *views(session))

    def step(session):
        if session is None:
            return (session, *views(None))
        session.step()
        return (session, *views(session))

    with gr.Blocks(title="Dreamer on Procgen") as app:
        gr.Markdown("# Dreamer on Procgen: reality and dreams")
        session = gr.State(None)
        with gr.Row():
            ckpt = gr.Textbox(label="checkpoint (.ckpt)", value=default_ckpt or "", elem_id="ckpt", scale=4)
            load_button = gr.Button("Load", elem_id="load", scale=1)
        status = gr.Markdown("No checkpoint loaded.", elem_id="status")
        with gr.Row():
            game = gr.Dropdown(list(GAMES + SANITY_GAMES), value="coinrun", label="game", elem_id="game")
            split = gr.Radio(list(SPLITS), value="training", label="levels", elem_id="split")
            index = gr.Number(0, precision=0, minimum=0, label="level index", elem_id="level")
            show_goals = gr.Checkbox(False, label="show goals", elem_id="goals")
        with gr.Row():
            start_button = gr.Button("Start episode", elem_id="start")
            step_button = gr.Button("Step", variant="primary", elem_id="step")
            auto = gr.Checkbox(False, label="auto-play", elem_id="auto")
        info = gr.Markdown(elem_id="info")
        with gr.Row():
            frame = gr.Image(label="real frame", elem_id="real-frame", interactive=False, format="png")
            goal_image = gr.Image(label="active goal (decoded)", elem_id="goal", interactive=False, format="png")
        goal_text = gr.Markdown(elem_id="goal-text")
        gr.Markdown(f"**Imagined next {DREAM_STEPS} steps** (the actor's own actions; predicted "
                    "reward r and value v under each)")
        film = gr.Image(show_label=False, elem_id="filmstrip", interactive=False, format="png")
        value = gr.Image(label="value estimate", elem_id="value", interactive=False, format="png")
        timer = gr.Timer(0.3, active=False)

        shown = [frame, film, value, goal_image, goal_text, info]
        load_button.click(load, [ckpt, show_goals], [session, game, show_goals, status, *shown])
        start_button.click(restart, [session, game, split, index, show_goals], [session, *shown])
        step_button.click(step, [session], [session, *shown])
        auto.change(lambda on: gr.Timer(active=bool(on)), [auto], [timer])
        timer.tick(step, [session], [session, *shown])
        if default_ckpt:
            app.load(load, [ckpt, show_goals], [session, game, show_goals, status, *shown])
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="a .ckpt written by `cli.py fit` (can also be loaded in the page)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also create a public gradio.live link")
    args = parser.parse_args(argv)
    if args.checkpoint:
        try:
            load_agent(args.checkpoint)
        except DemoError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    import gradio as gr

    app = build_app(args.checkpoint)
    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["monospace"])
    app.launch(server_name=args.host, server_port=args.port, share=args.share, theme=theme)


if __name__ == "__main__":
    main()
