"""How good is a world model? Measured on real sequences it did not train on.

- ``posterior_quality``: run the posterior over whole recorded lanes (state carried from the
  first frame) and score what it reads back: reconstruction error, reward and continue
  predictions (means and ROC AUC), the KL and how often it rises above free bits.
- ``dream_quality``: from fixed windows, observe ``context`` real frames, imagine ``horizon``
  steps with the real actions, and compare each imagined frame with the real one next to
  copying the last real frame; as a skill score ``1 - err_model / err_copy`` over all pixels
  and over the pixels that change between consecutive real frames (where the game happens);
  and the same skill with the actions shuffled across windows: what knowing the actions adds.
- ``dream_returns``: imagined returns of each first action from given states, to set beside the
  real game's from the same states (``benchmarks/world_model_quality.py`` restores them with the
  env's ``get_state``/``set_state``): do the dreams know what an action changes, and how much?

Both take recorded lanes as NumPy arrays (N lanes, L steps) in the replay's layout: ``frames``
uint8 (N, L, 64, 64, 3), ``action`` (N, L) taken at each step, ``reward`` (N, L) received on
arriving, ``is_first`` / ``is_terminal`` (N, L).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from dreamer.distributions import categorical_kl

HORIZONS = (1, 5, 10, 15)


def roc_auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative (ties count half). NaN without both classes."""
    score, label = np.asarray(score, np.float64).ravel(), np.asarray(label, bool).ravel()
    pos, neg = int(label.sum()), int((~label).sum())
    if pos == 0 or neg == 0:
        return float("nan")
    order = np.argsort(score, kind="mergesort")
    sorted_score = score[order]
    ranks = np.empty(len(score), np.float64)
    # average rank (1-based) over each run of tied scores
    starts = np.flatnonzero(np.r_[True, sorted_score[1:] != sorted_score[:-1]])
    ends = np.r_[starts[1:], len(score)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return float((ranks[label].sum() - pos * (pos + 1) / 2) / (pos * neg))


def _to(x: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)


@torch.no_grad()
def posterior_quality(world_model, lanes: dict[str, np.ndarray], chunk: int = 64) -> dict[str, float]:
    """Posterior read-back over whole lanes (N, L); the state is carried across chunks.

    Returns ``recon_mse`` (per pixel and channel, intensities in [0, 1]), ``reward_auc`` (rewarded
    vs unrewarded steps, scored by the predicted reward), ``reward_pos`` / ``reward_neg`` (mean
    prediction on each), ``rewarded_steps``, ``cont_auc`` (non-terminal vs terminal steps, scored
    by the continue probability), ``cont_terminal`` / ``cont_other`` (means), ``terminal_steps``,
    ``kl`` (mean dynamics KL per step, summed over latents) and ``kl_above_free`` (share of steps
    whose KL exceeds free bits).
    """
    wm = world_model
    device = next(wm.parameters()).device
    rssm = wm.rssm
    n, length = lanes["action"].shape
    state, prev_action = None, None
    sq_err, pixels = 0.0, 0
    rew_pred, cont_pred, kls = [], [], []
    for t0 in range(0, length, chunk):
        sl = slice(t0, min(t0 + chunk, length))
        obs = _to(lanes["frames"][:, sl], device)
        action = _to(lanes["action"][:, sl], device).long()
        is_first = _to(lanes["is_first"][:, sl], device).bool()
        post, prior = rssm.observe(wm.encoder(obs), action, is_first, state, prev_action)
        feat = rssm.features(post)  # (N, T, F)
        recon = wm.decoder(feat)
        sq_err += float(((recon - obs.float() / 255.0) ** 2).sum())
        pixels += recon.numel()
        rew_pred.append(wm.reward(feat).float().cpu())
        cont_pred.append(wm.continue_prob(feat).cpu())
        kls.append(categorical_kl(post["logits"], prior["logits"]).sum(-1).float().cpu())
        state = {k: v[:, -1] for k, v in post.items()}
        prev_action = action[:, -1]
    rew_pred = torch.cat(rew_pred, 1).numpy()
    cont_pred = torch.cat(cont_pred, 1).numpy()
    kl = torch.cat(kls, 1).numpy()
    reward, terminal = lanes["reward"], lanes["is_terminal"].astype(bool)
    rewarded = reward > 0
    nan = float("nan")
    return {
        "recon_mse": sq_err / pixels,
        "reward_auc": roc_auc(rew_pred, rewarded),
        "reward_pos": float(rew_pred[rewarded].mean()) if rewarded.any() else nan,
        "reward_neg": float(rew_pred[~rewarded].mean()) if (~rewarded).any() else nan,
        "rewarded_steps": int(rewarded.sum()),
        "cont_auc": roc_auc(cont_pred, ~terminal),
        "cont_terminal": float(cont_pred[terminal].mean()) if terminal.any() else nan,
        "cont_other": float(cont_pred[~terminal].mean()) if (~terminal).any() else nan,
        "terminal_steps": int(terminal.sum()),
        "kl": float(kl.mean()),
        "kl_above_free": float((kl > wm.hp.free_bits).mean()),
    }


def dream_windows(is_first: np.ndarray, context: int, horizon: int, stride: int) -> np.ndarray:
    """(K, 2) (lane, start) of windows of ``context + horizon`` steps, every ``stride`` steps of
    every lane, keeping those whose first imagined step is not an episode start."""
    n, length = is_first.shape
    starts = np.arange(0, length - context - horizon + 1, stride)
    out = [(lane, s) for lane in range(n) for s in starts if not is_first[lane, s + context]]
    return np.array(out, np.int64).reshape(-1, 2)


class SkillByHorizon:
    """Pooled squared errors by horizon of predicted frames and of copying the last real frame.

    ``add`` takes real and predicted frames (K, H, 64, 64, 3) in [0, 1], the last real frame
    before the dream ``last`` (K, 64, 64, 3) and ``valid`` (K, H). ``result`` gives, per horizon
    h (1-based): ``mse_h``, ``copy_mse_h`` (per pixel and channel), ``skill_h`` = 1 - model / copy
    over all pixels, and ``skill_changed_h`` over the pixels whose real value changed from step
    h-1 to h in any channel (step 0 is ``last``).
    """

    def __init__(self, horizon: int) -> None:
        self.sums = {k: np.zeros(horizon) for k in ("model", "copy", "model_ch", "copy_ch", "n")}

    def add(self, real: np.ndarray, pred: np.ndarray, last: np.ndarray, valid: np.ndarray) -> None:
        prev = np.concatenate([last[:, None], real[:, :-1]], 1)  # real frame one step earlier
        v = valid[..., None, None, None]
        changed = (np.abs(real - prev).max(-1, keepdims=True) > 0) & v  # (K, H, 64, 64, 1)
        model_sq, copy_sq = (pred - real) ** 2, (last[:, None] - real) ** 2
        s = self.sums
        s["model"] += (model_sq * v).sum((0, 2, 3, 4))
        s["copy"] += (copy_sq * v).sum((0, 2, 3, 4))
        s["n"] += valid.sum(0) * real[0, 0].size
        s["model_ch"] += (model_sq * changed).sum((0, 2, 3, 4))
        s["copy_ch"] += (copy_sq * changed).sum((0, 2, 3, 4))

    def result(self, horizons: tuple[int, ...]) -> dict[str, float]:
        s, out = self.sums, {}
        with np.errstate(invalid="ignore", divide="ignore"):
            for h in horizons:
                k = h - 1
                out[f"mse_h{h}"] = float(s["model"][k] / s["n"][k])
                out[f"copy_mse_h{h}"] = float(s["copy"][k] / s["n"][k])
                out[f"skill_h{h}"] = float(1 - s["model"][k] / s["copy"][k])
                out[f"skill_changed_h{h}"] = float(1 - s["model_ch"][k] / s["copy_ch"][k])
        return out


@torch.no_grad()
def dream_quality(
    world_model, lanes: dict[str, np.ndarray], context: int = 16, horizon: int = 15,
    stride: int = 24, batch: int = 64, horizons: tuple[int, ...] = HORIZONS,
) -> dict[str, float]:
    """Open-loop dream error by horizon against copying the last real frame (``SkillByHorizon``).

    For each window (``dream_windows``): observe ``context`` real frames (from a zero state, the
    window's first step taken as an episode start), then imagine ``horizon`` steps with the real
    actions, and again with the actions of another window of the batch (shuffled: the batch's
    windows rolled by one). Steps from the first new episode on are left out (a reset cannot be
    predicted). Returns ``SkillByHorizon.result`` for ``horizons``, the same with ``_shuffled``
    appended to each key (e.g. ``skill_shuffled_h5``), ``action_gain_h`` = skill - shuffled skill
    (0 = the dream ignores the actions; it cannot beat the shuffle by chance on average), and the
    number of ``windows``.
    """
    wm = world_model
    device = next(wm.parameters()).device
    rssm = wm.rssm
    windows = dream_windows(lanes["is_first"], context, horizon, stride)
    skill, shuffled = SkillByHorizon(horizon), SkillByHorizon(horizon)
    steps = np.arange(context + horizon)
    for i in range(0, len(windows), batch):
        idx = (windows[i : i + batch, 0:1], windows[i : i + batch, 1:2] + steps)  # (K, C + H)
        frames = lanes["frames"][idx]
        action = _to(lanes["action"][idx], device).long()
        is_first = _to(lanes["is_first"][idx][:, :context], device).bool()
        post, _ = rssm.observe(wm.encoder(_to(frames[:, :context], device)), action[:, :context], is_first)
        start = {k: v[:, -1] for k, v in post.items()}
        real = frames[:, context:].astype(np.float32) / 255.0
        last = frames[:, context - 1].astype(np.float32) / 255.0
        valid = np.cumsum(lanes["is_first"][idx][:, context:], 1) == 0  # (K, H)
        dreamt = action[:, context - 1 : context - 1 + horizon]  # (K, H) the actions the dream takes
        for score, acts in ((skill, dreamt), (shuffled, dreamt.roll(1, 0))):
            state, feats = start, []
            for h in range(horizon):
                state = rssm.img_step(state, F.one_hot(acts[:, h], rssm.num_actions).float())
                feats.append(rssm.features(state))
            pred = wm.decoder(torch.stack(feats, 1)).clamp(0, 1).float().cpu().numpy()  # (K, H, 64, 64, 3)
            score.add(real, pred, last, valid)
    out = skill.result(horizons)
    other = {k.replace("_h", "_shuffled_h", 1): v for k, v in shuffled.result(horizons).items()}
    gain = {f"action_gain_h{h}": out[f"skill_h{h}"] - other[f"skill_shuffled_h{h}"] for h in horizons}
    return {"windows": float(len(windows)), **out, **other, **gain}


@torch.no_grad()
def dream_returns(world_model, start: dict[str, torch.Tensor], first: torch.Tensor, later: torch.Tensor) -> torch.Tensor:
    """Imagined returns from each start state (K, ...) of each first action, followed by the same
    actions for all of them: ``first`` (A,) the first actions to try, ``later`` (K, H) the actions
    after it. Each step takes the prior's most likely class of every latent (no sampling noise, so
    the first action is all that differs); a reward counts weighted by the predicted probability
    that the episode has not ended before it. Returns (K, A) sums over the 1 + H steps."""
    wm, rssm = world_model, world_model.rssm
    k, a = start["deter"].shape[0], len(first)
    state = {key: start[key].repeat_interleave(a, 0) for key in ("deter", "stoch")}  # (K * A, ...)
    total = torch.zeros(k * a, device=first.device)
    alive = torch.ones(k * a, device=first.device)
    for actions in [first.repeat(k), *later.T.repeat_interleave(a, 1)]:  # each (K * A,)
        deter = rssm.step_deter(state, F.one_hot(actions, rssm.num_actions).float())
        stoch = F.one_hot(rssm.prior_logits(deter).argmax(-1), rssm.classes).to(deter.dtype)
        state = {"deter": deter, "stoch": stoch}
        feat = rssm.features(state)
        total += alive * wm.reward(feat).float()
        alive = alive * wm.continue_prob(feat)
    return total.reshape(k, a)


def spread_ratio(dream: np.ndarray, game: np.ndarray) -> dict[str, float]:
    """How the dreams' returns (K, A) across first actions compare with the game's from the same
    states: ``spread_dream`` / ``spread_game`` the mean over states of the standard deviation
    across first actions, ``spread_ratio`` their quotient (1: the dreams think the actions matter
    as much as they do), and ``action_corr`` the mean over states where the actions matter in the
    game of the correlation between dream and game returns across actions (1: the dreams rank the
    actions as the game does; 0: no better than guessing)."""
    dream, game = np.asarray(dream, np.float64), np.asarray(game, np.float64)
    sd, sg = dream.std(1), game.std(1)
    matters = sg > 1e-9
    d, g = dream[matters], game[matters]
    varied = sd[matters] > 1e-12  # a dream blind to the actions correlates 0
    dc = d[varied] - d[varied].mean(1, keepdims=True)
    gc = g[varied] - g[varied].mean(1, keepdims=True)
    corr = np.zeros(len(d))
    corr[varied] = (dc * gc).mean(1) / (sd[matters][varied] * sg[matters][varied])
    nan = float("nan")
    return {
        "spread_dream": float(sd.mean()), "spread_game": float(sg.mean()),
        "spread_ratio": float(sd.mean() / sg.mean()) if sg.mean() > 0 else nan,
        "action_corr": float(corr.mean()) if len(corr) else nan,
        "states_where_actions_matter": float(matters.mean()),
    }
