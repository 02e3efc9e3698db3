"""What the agent imagines, as arrays and pictures: open-loop dreams beside real frames, dream
error by horizon, value traces.

Used by ``callbacks/visualize.py`` (pictures in MLflow) and ``demo.py`` (the web demo). The array
functions take and return NumPy (uint8 frames ``(..., 64, 64, 3)``); the pictures are uint8 RGB
arrays, so they can be saved, logged or shown alike.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dreamer.rssm import State

PSNR_CAP = 100.0  # dB reported for a perfect prediction (the true PSNR is infinite)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoder output in [0, 1] -> uint8 frames."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()


def decode(agent, feat: torch.Tensor) -> np.ndarray:
    """uint8 frames (..., 64, 64, 3) the world model decodes from features (..., F)."""
    return to_uint8(agent.world_model.decoder(feat))


# ------------------------------------------------------------------ dreams
@torch.no_grad()
def open_loop(
    agent, obs: np.ndarray, action: np.ndarray, is_first: np.ndarray, context: int,
    horizon: int | None = None, own_actions: bool = False,
) -> dict[str, np.ndarray]:
    """Observe the first ``context`` real frames, then imagine ``horizon`` steps open loop.

    ``obs`` (N, L, 64, 64, 3), ``action`` (N, L), ``is_first`` (N, L) as from ``play``. The dream
    takes the real actions ``action[context - 1 :]`` (or, with ``own_actions``, the actor's
    samples). Returns for the dreamed steps ``context .. context + H - 1``: ``pred`` (N, H, 64, 64,
    3) uint8, ``reward`` (N, H) predicted on arriving, ``value`` (N, H), ``cont`` (N, H), ``action``
    (N, H) the action that led there, ``step`` (H,) their indices; with real actions also ``real``
    (N, H, ...) the true frames, ``last`` (N, 64, 64, 3) the last context frame and ``valid`` (N, H),
    false from the first new episode on (a reset cannot be predicted).
    """
    n, length = action.shape
    if not 1 <= context < length and not own_actions:
        raise ValueError(f"context must be in [1, {length - 1}] for sequences of {length} steps, got {context}")
    horizon = horizon if horizon is not None else length - context
    if not own_actions and context + horizon > length:
        raise ValueError(f"context {context} + horizon {horizon} exceeds the {length} real steps")
    wm, device = agent.world_model, agent.device
    embed = wm.encoder(torch.from_numpy(obs[:, :context]).to(device))
    act = torch.from_numpy(action).long().to(device)
    post, _ = wm.rssm.observe(embed, act[:, :context], torch.from_numpy(is_first[:, :context]).to(device))
    state: State = {k: v[:, -1] for k, v in post.items()}  # (N, ...) after the context
    policy = agent.actor_critic.sample if own_actions else act[:, context - 1 : context - 1 + horizon].T  # (H, N)
    _, feat, actions = wm.rssm.imagine(state, policy, horizon, keep_states=False)
    feat = feat[1:].transpose(0, 1)  # (H + 1, N, F) -> (N, H, F), the dreamed steps
    out = {
        "pred": decode(agent, feat),
        "reward": wm.reward(feat).cpu().numpy(),
        "value": agent.actor_critic.value(feat).cpu().numpy(),
        "cont": wm.continue_prob(feat).cpu().numpy(),
        "action": actions.transpose(0, 1).cpu().numpy(),
        "step": np.arange(context, context + horizon),
    }
    if not own_actions:
        out["real"] = obs[:, context : context + horizon]
        out["last"] = obs[:, context - 1]
        out["valid"] = np.cumsum(is_first[:, context : context + horizon], 1) == 0
    return out


def horizon_errors(
    real: np.ndarray, pred: np.ndarray, last: np.ndarray, valid: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Per-horizon error of predicted frames against real ones, and of the copy-the-last-frame
    baseline. ``real``, ``pred`` (N, H, 64, 64, 3) uint8, ``last`` (N, 64, 64, 3), ``valid`` (N, H).

    Returns ``error``, ``psnr``, ``baseline_error``, ``baseline_psnr`` and ``count``, each (H,):
    mean per-pixel squared error on [0, 1] intensities over valid sequences, and the PSNR (dB) of
    that mean error (capped at ``PSNR_CAP`` when it is 0). NaN where no sequence is valid.
    """
    real = real.astype(np.float64) / 255.0
    valid = np.ones(real.shape[:2], bool) if valid is None else valid
    count = valid.sum(0)
    out = {"count": count}
    for name, guess in (("", pred.astype(np.float64) / 255.0), ("baseline_", last[:, None] / 255.0)):
        mse = ((guess - real) ** 2).mean((-3, -2, -1))  # (N, H)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, (mse * valid).sum(0) / np.maximum(count, 1), np.nan)
            psnr = np.minimum(10 * np.log10(1.0 / mean), PSNR_CAP)
        out[f"{name}error"], out[f"{name}psnr"] = mean, psnr
    return out


# ------------------------------------------------------------------ pictures
LABEL_H, MARGIN_W, GAP = 40, 64, 2
WRAP = 5  # columns per block in the dream pictures: 714 px wide at scale 2, readable in MLflow's preview


def frame_box(row: int, col: int, scale: int, n_rows: int = 1, wrap: int | None = None) -> tuple[slice, slice]:
    """Where frame (row, col) lies in a ``render_rows`` picture of ``n_rows`` rows wrapped every
    ``wrap`` columns: (rows, cols) slices."""
    size = 64 * scale
    block, col = divmod(col, wrap) if wrap else (0, col)
    top = block * (LABEL_H + n_rows * (size + GAP)) + LABEL_H + row * (size + GAP)
    left = MARGIN_W + col * (size + GAP)
    return slice(top, top + size), slice(left, left + size)


def render_rows(
    rows: list[tuple[str, np.ndarray]], labels: list[str] | None = None, scale: int = 2,
    wrap: int | None = None,
) -> np.ndarray:
    """A grid picture: one row per (name, frames (K, 64, 64, 3) uint8), frames enlarged
    ``scale`` times without smoothing, each column headed by its label (lines split on ``\\n``).
    With ``wrap``, columns continue in a new block (label band and rows again) below every
    ``wrap`` columns. Returns uint8 (H, W, 3)."""
    cols = max(len(frames) for _, frames in rows)
    per_block = min(cols, wrap) if wrap else cols
    blocks = -(-cols // per_block)
    size = 64 * scale
    height = blocks * (LABEL_H + len(rows) * (size + GAP))
    width = MARGIN_W + per_block * (size + GAP)
    canvas = np.full((height, width, 3), 255, np.uint8)
    n = len(rows)
    for r, (_, frames) in enumerate(rows):
        for c, frame in enumerate(frames):
            ys, xs = frame_box(r, c, scale, n, wrap)
            canvas[ys, xs] = frame.repeat(scale, 0).repeat(scale, 1)
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    for block in range(blocks):
        for r, (name, _) in enumerate(rows):
            ys, _ = frame_box(r, block * per_block, scale, n, wrap)
            draw.multiline_text((4, ys.start + size // 2 - 6), name, fill=(0, 0, 0), font=font, spacing=1)
    for c, label in enumerate(labels or []):
        ys, xs = frame_box(0, c, scale, n, wrap)
        draw.multiline_text((xs.start + 2, ys.start - LABEL_H + 2), label, fill=(0, 0, 0), font=font, spacing=1)
    # text never reaches into frames: the label bands and the margin are outside every frame box
    return np.asarray(image)


def difference(real: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """|real - pred| per pixel and channel, uint8 (black where the dream is exact)."""
    return np.abs(real.astype(np.int16) - pred.astype(np.int16)).astype(np.uint8)


def step_labels(dream: dict[str, np.ndarray], lane: int) -> list[str]:
    return [
        f"t={s}\nr={r:+.2f}\nv={v:+.2f}"
        for s, r, v in zip(dream["step"], dream["reward"][lane], dream["value"][lane])
    ]


def dream_vs_reality(dream: dict[str, np.ndarray], lane: int = 0, scale: int = 2) -> np.ndarray:
    """Picture of one lane of an ``open_loop`` dream with real actions: real, imagined and
    difference rows, columns labelled with step, predicted reward and value."""
    real, pred = dream["real"][lane], dream["pred"][lane]
    rows = [("real", real), ("dream", pred), ("|diff|", difference(real, pred))]
    return render_rows(rows, step_labels(dream, lane), scale, WRAP)


def own_dream(dream: dict[str, np.ndarray], lane: int = 0, scale: int = 2) -> np.ndarray:
    """Picture of one lane of an ``open_loop`` dream with the actor's own actions."""
    labels = [f"{label}\na={a}" for label, a in zip(step_labels(dream, lane), dream["action"][lane])]
    return render_rows([("actor's\ndream", dream["pred"][lane])], labels, scale, WRAP)


def save_gif(path: str | Path, dream: dict[str, np.ndarray], lane: int = 0, scale: int = 2,
             ms_per_frame: int = 120) -> Path:
    """Animated GIF of a longer dream: real | imagined | difference side by side, one frame per step."""
    real, pred = dream["real"][lane], dream["pred"][lane]
    frames = []
    for step, r, p in zip(dream["step"], real, pred):
        frame = render_rows([("real", r[None]), ("dream", p[None]), ("|diff|", difference(r, p)[None])],
                            [f"t={step}"], scale)
        frames.append(Image.fromarray(frame))
    path = Path(path)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=ms_per_frame, loop=0)
    return path


def _figure_to_array(fig) -> np.ndarray:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def _figure(width: float = 6.0, height: float = 3.2):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(width, height))


def error_plot(errors: dict[str, np.ndarray]) -> np.ndarray:
    """Plot of ``horizon_errors``: model and copy-last-frame error against horizon."""
    fig, ax = _figure()
    h = np.arange(1, len(errors["error"]) + 1)
    ax.plot(h, errors["error"], "o-", label="world model (open loop)")
    ax.plot(h, errors["baseline_error"], "s--", label="copy last frame")
    ax.set_xlabel("horizon (steps)")
    ax.set_ylabel("mean squared error per pixel")
    ax.set_title("dream error by horizon, unseen levels")
    ax.grid(alpha=0.3)
    ax.legend()
    return _figure_to_array(fig)


def value_trace_plot(value: np.ndarray, reward: np.ndarray, title: str = "value over an episode") -> np.ndarray:
    """The value estimate at each step (T,), with the steps that received reward marked."""
    fig, ax = _figure()
    t = np.arange(len(value))
    ax.plot(t, value, label="value estimate")
    hit = np.flatnonzero(reward != 0)
    if len(hit):
        ax.scatter(hit, value[hit], c=np.where(reward[hit] > 0, "tab:green", "tab:red"), zorder=3,
                   label="reward received (green +, red -)")
        for i in hit:
            ax.annotate(f"{reward[i]:+g}", (i, value[i]), textcoords="offset points", xytext=(0, 6),
                        ha="center", fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("value")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _figure_to_array(fig)


def episode_trace(played: dict[str, np.ndarray], lane: int = 0) -> dict[str, Any]:
    """Value and reward of the first episode in ``lane`` of ``play`` output (up to its end)."""
    first = np.flatnonzero(played["is_first"][lane, 1:])
    end = int(first[0]) + 1 if len(first) else played["value"].shape[1]
    # reward[t] arrives on reaching step t, so the reward for acting at step t is reward[t + 1];
    # the episode's final reward comes with the next episode's first frame (same-step reset)
    reward = np.zeros(end, np.float32)
    after = played["reward"][lane, 1 : end + 1]
    reward[: len(after)] = after
    return {"value": played["value"][lane, :end], "reward": reward, "complete": bool(len(first))}
