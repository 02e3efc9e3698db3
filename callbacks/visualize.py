"""DreamVisualizer: pictures of what the agent imagines, logged to MLflow and saved with the run."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import MLFlowLogger

from callbacks.training import env_steps_of
from datamodules.collector import Rollout
from datamodules.procgen import ProcgenVectorEnv, unseen_env
from dreamer import visuals
from dreamer.distributions import isolated_rng


class ActorPolicy:
    """The agent acting with its actor alone (no goal pursuit), as in plain DreamerV3."""

    def __init__(self, agent) -> None:
        self.agent = agent

    def act(self, obs: torch.Tensor, is_first: torch.Tensor, state: Any, reward: torch.Tensor | None = None):
        post = self.agent.observe_step(obs, is_first, state)
        action = self.agent.actor_critic.sample(self.agent.world_model.rssm.features(post))
        return action.cpu(), (post, action)


@torch.no_grad()
def play(env, agent, steps: int) -> dict[str, np.ndarray]:
    """Play ``steps`` steps from fresh episodes in every lane of ``env`` with the agent's actor.

    Returns ``obs`` (N, L, 64, 64, 3) uint8, ``action`` (N, L) taken at each step (action[t] leads
    to step t + 1), ``reward`` (N, L) received on arriving at each step, ``is_first`` (N, L), and
    ``value`` (N, L) the critic's estimate at each step.
    """
    rollout, policy = Rollout(env), ActorPolicy(agent)
    out: dict[str, list[np.ndarray]] = {k: [] for k in ("obs", "action", "reward", "is_first", "value")}
    reward = np.zeros(env.num_envs, np.float32)  # kept at a reset: an episode's final reward
    for _ in range(steps):
        rollout.act(policy)
        feat = agent.world_model.rssm.features(rollout.state[0])
        out["value"].append(agent.actor_critic.value(feat).cpu().numpy())
        t = rollout.step()
        for key, value in (("obs", t.obs), ("reward", reward), ("is_first", t.is_first), ("action", t.action)):
            out[key].append(value)
        reward = t.reward.astype(np.float32)
    return {k: np.stack(v, 1) for k, v in out.items()}


class DreamVisualizer(pl.Callback):
    """Every ``every_n_updates`` updates, when training ends and at ``validate``, on rank 0:

    - plays ``lanes`` fresh episodes on unseen levels (the same levels each time) for
      ``context + max(horizon, gif_steps)`` steps with the agent's actor;
    - dream vs reality: observes ``context`` real frames, imagines ``horizon`` steps with the real
      actions and draws real, imagined and difference rows (``dream_vs_reality_<env steps>.png``);
      a second picture imagines with the actor's own actions (``actor_dream_...png``); an animated
      GIF shows a ``gif_steps``-step dream beside reality (``dream_...gif``);
    - dream error by horizon over all lanes against the copy-the-last-frame baseline, logged as
      ``dream/error_h{k}``, ``dream/psnr_h{k}``, ``dream/baseline_error_h{k}``,
      ``dream/baseline_psnr_h{k}`` and the skill ``dream/skill_h{k}`` = 1 - error / baseline error
      (above 0: better than copying), and plotted (``dream_error_...png``);
    - a value trace over one whole unseen-level episode (at most ``trace_steps`` steps) with its
      rewards marked (``value_trace_...png``).

    Files go to ``<run dir>/dreams/`` and into the MLflow run's ``dreams/`` artifacts. It draws on
    its own random stream, so training is the same with or without it; ``enabled`` False draws
    nothing (the CLI always adds it, as the ``dream_pictures`` config section).
    """

    def __init__(
        self, every_n_updates: int = 1000, context: int = 5, horizon: int = 15, gif_steps: int = 48,
        lanes: int = 8, trace_steps: int = 1000, scale: int = 2, seed: int = 12345, enabled: bool = True,
    ) -> None:
        for name, value in (("every_n_updates", every_n_updates), ("context", context),
                            ("horizon", horizon), ("gif_steps", gif_steps), ("lanes", lanes),
                            ("trace_steps", trace_steps), ("scale", scale)):
            if int(value) < 1:
                raise ValueError(f"DreamVisualizer: {name} must be a positive integer, got {value}")
        self.every, self.context, self.horizon, self.gif_steps = every_n_updates, context, horizon, gif_steps
        self.lanes, self.trace_steps, self.scale, self.seed = lanes, trace_steps, scale, seed
        self.enabled = enabled
        self.last_files: dict[str, Path] = {}
        self.last_metrics: dict[str, float] = {}
        self._done_at: int | None = None

    # ------------------------------------------------------------- hooks
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.enabled and pl_module.updates % self.every == 0:
            self.visualize(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.enabled:
            self.visualize(trainer, pl_module)
            self._announce(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.enabled and trainer.state.fn == "validate":
            self.visualize(trainer, pl_module)
            self._announce(trainer)

    def _announce(self, trainer) -> None:
        if trainer.is_global_zero and "dream_vs_reality" in self.last_files:
            skill = [f"h{k} {self.last_metrics[f'dream/skill_h{k}']:+.2f}"
                     for k in (1, 5, 10, 15) if f"dream/skill_h{k}" in self.last_metrics]
            if skill:
                print("dream skill on unseen levels (1 - error / copy-last-frame error): " + ", ".join(skill))
            print(f"dream picture: {self.last_files['dream_vs_reality']}")

    # ------------------------------------------------------------- work
    def _env(self, trainer, num_envs: int, seed: int) -> ProcgenVectorEnv:
        options = trainer.datamodule.hparams.procgen_options or {}
        return unseen_env(trainer.datamodule.env_config, num_envs, seed, **options)

    @torch.compiler.set_stance("force_eager")  # pictures need no compiled networks (see Dreamer.act)
    def visualize(self, trainer: pl.Trainer, pl_module) -> dict[str, Path]:
        """Make and log every picture and metric now; returns the files written."""
        step = env_steps_of(trainer)
        if not trainer.is_global_zero or trainer.datamodule is None or self._done_at == step:
            return {}
        self._done_at = step
        out_dir = Path(trainer.default_root_dir) / "dreams"
        out_dir.mkdir(parents=True, exist_ok=True)
        was_training = pl_module.training
        pl_module.eval()
        try:
            with isolated_rng(pl_module.device, self.seed), torch.no_grad():
                files, metrics = self._make(trainer, pl_module, out_dir, step)
        finally:
            pl_module.train(was_training)
        self._log(trainer, files, metrics, step)
        self.last_files, self.last_metrics = files, metrics
        return files

    def _make(self, trainer, agent, out_dir: Path, step: int):
        length = self.context + max(self.horizon, self.gif_steps)
        env = self._env(trainer, self.lanes, self.seed)
        try:
            played = play(env, agent, length)
        finally:
            env.close()
        obs, action, is_first = played["obs"], played["action"], played["is_first"]
        dream = visuals.open_loop(agent, obs, action, is_first, self.context, self.horizon)
        lane = int(np.argmax(dream["valid"].sum(1)))  # a lane whose episode lasts longest
        errors = visuals.horizon_errors(dream["real"], dream["pred"], dream["last"], dream["valid"])
        own = visuals.open_loop(agent, obs[lane : lane + 1], action[lane : lane + 1],
                                is_first[lane : lane + 1], self.context, self.horizon, own_actions=True)
        long = visuals.open_loop(agent, obs[lane : lane + 1], action[lane : lane + 1],
                                 is_first[lane : lane + 1], self.context, self.gif_steps)
        trace_env = self._env(trainer, 1, self.seed + 1)
        try:
            trace = visuals.episode_trace(play(trace_env, agent, self.trace_steps))
        finally:
            trace_env.close()

        files = {
            "dream_vs_reality": self._png(out_dir / f"dream_vs_reality_{step}.png",
                                          visuals.dream_vs_reality(dream, lane, self.scale)),
            "actor_dream": self._png(out_dir / f"actor_dream_{step}.png",
                                     visuals.own_dream(own, 0, self.scale)),
            "dream_error": self._png(out_dir / f"dream_error_{step}.png", visuals.error_plot(errors)),
            "value_trace": self._png(
                out_dir / f"value_trace_{step}.png",
                visuals.value_trace_plot(trace["value"], trace["reward"],
                                         f"value over an unseen-level episode ({len(trace['value'])} steps)"),
            ),
            "dream_gif": visuals.save_gif(out_dir / f"dream_{step}.gif", long, 0, self.scale),
        }
        metrics = {}
        for k in range(self.horizon):
            if errors["count"][k] > 0:
                for name in ("error", "psnr", "baseline_error", "baseline_psnr"):
                    metrics[f"dream/{name}_h{k + 1}"] = float(errors[name][k])
                if errors["baseline_error"][k] > 0:
                    metrics[f"dream/skill_h{k + 1}"] = 1.0 - float(errors["error"][k] / errors["baseline_error"][k])
        metrics["dream/trace_return"] = float(trace["reward"].sum())
        return files, metrics

    @staticmethod
    def _png(path: Path, image: np.ndarray) -> Path:
        Image.fromarray(image).save(path)
        return path

    @staticmethod
    def _log(trainer, files: dict[str, Path], metrics: dict[str, float], step: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, MLFlowLogger) and logger.run_id is not None:
                for path in files.values():
                    logger.experiment.log_artifact(logger.run_id, os.fspath(path), artifact_path="dreams")
