"""World-model quality on fixed data: the fast loop for changing the world model.

    python benchmarks/world_model_quality.py --games coinrun starpilot --size small --updates 2000
    python benchmarks/world_model_quality.py --games coinrun --minutes 10 --model world_model.scale_dyn=1.0
    python benchmarks/world_model_quality.py --games coinrun --save-data data/{game}.npz --updates 0
    python benchmarks/world_model_quality.py --games coinrun --data data/{game}.npz --updates 500

Per game it collects a dataset deterministically (a seeded random policy that keeps its previous
action with probability ``--persist``): ``--train-steps`` on the training levels and
``--eval-steps`` on unseen levels, in the replay's layout (terminal steps included). Then it trains
the world model alone on uniform replay batches, for ``--updates`` updates or ``--minutes`` of
training time, and at ``--evals`` points along the way prints, on the unseen-level data:

- recon: posterior reconstruction error (MSE per pixel and channel);
- skill_h: open-loop dream skill with the real actions, 1 - err_model / err_copy-last-frame, over
  all pixels and (skillc_h) over the pixels that change between consecutive real frames;
  above 0 is better than copying the last real frame;
- rAUC / r+ / r-: reward prediction on rewarded vs unrewarded steps (ROC AUC, means);
  rAUCtr: the same ROC AUC on the first 512 steps of each training-level lane (data it trains on);
  cAUC: continue probability on non-terminal vs terminal steps (ROC AUC);
- KL (dynamics KL per step) and >free (share of steps above free bits); upd/s (training only);
- gain5: skill_h5 with the real actions minus with the actions shuffled across windows (what
  knowing the actions adds to the dream; 0 = the dreams ignore them);
- aspr / acor, the dreams against the real game from the same states: from 64 unseen-level
  states (restored with the env's ``get_state``/``set_state``), each of the 15 first actions
  followed by the same 15 random actions in dream and game; aspr = the spread (SD across first
  actions) of the dreams' 16-step returns over the game's (1: the dream thinks actions matter as
  much as they do), acor = their correlation across first actions (1: it ranks them as the game).
  Needs procgen for Procgen games (with ``--data`` and no procgen they are skipped, in one line).

``--save-data`` writes the dataset to a compressed file, ``--data`` trains from one (no procgen
needed, e.g. on a GPU machine). ``--size``, ``--overrides`` and ``--model`` take any preset, size
entry and ``Dreamer`` argument. ``--precision bf16`` trains under bf16 autocast, as Lightning's
``bf16-mixed`` does; evaluations always run in float32, so both precisions are judged alike.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datamodules.games import GAMES, MODES, SANITY_GAMES, RandomPolicy, unseen_mode  # noqa: E402
from datamodules.replay import FIELDS, FIRST, TERMINAL, SequenceReplay, replay_batch, store_posteriors  # noqa: E402
from dreamer.agent import Dreamer  # noqa: E402
from dreamer.config import SIZES  # noqa: E402
from dreamer.checkpoints import read_checkpoint, restore_agent  # noqa: E402
from dreamer.quality import HORIZONS, dream_quality, dream_returns, posterior_quality, spread_ratio  # noqa: E402

FORMAT_VERSION = 1


class PersistentRandomPolicy(RandomPolicy):
    """Uniform random actions that repeat the previous action with probability ``persist``."""

    def __init__(self, seed: int, persist: float) -> None:
        super().__init__(seed)
        self.persist = persist
        self.last: np.ndarray | None = None

    def actions(self, n: int) -> np.ndarray:
        fresh = self.rng.integers(0, 15, size=n)
        if self.last is None or len(self.last) != n:
            self.last = fresh
        else:
            keep = self.rng.random(n) < self.persist
            self.last = np.where(keep, self.last, fresh)
        return self.last


def collect(game: str, mode: str, start_level: int, num_levels: int, lanes: int, steps: int,
            seed: int, persist: float) -> dict[str, np.ndarray]:
    """``steps`` env steps over ``lanes`` envs, written by the training collector into a replay;
    returns its arrays (lanes, stored steps) and the stored steps per lane (``count``)."""
    from datamodules.replay_datamodule import ReplayDataModule  # procgen: not needed with --data

    per_lane = -(-steps // lanes)
    dm = ReplayDataModule(
        game=game, num_envs=lanes, distribution_mode=mode, num_levels=num_levels,
        start_level=start_level, seed=seed, seq_len=1, learning_starts=2**62,
        replay_capacity=lanes * (2 * per_lane + 64), replay_storage="ram",
    )
    dm.setup("fit")
    dm.random_policy = PersistentRandomPolicy(seed, persist)
    dm.collector.collect(dm.policy, per_lane)
    replay = dm.replay
    written = int(replay.count.max())
    out = {k: np.ascontiguousarray(replay.data[k][:, :written]) for k in FIELDS}
    out["count"] = replay.count.copy()
    dm.collector.env.close(), dm.eval_env("unseen_levels").close()
    return out


PROBE_STATES, PROBE_STEPS, PROBE_LATER = 64, 24, 15


def playable(game: str) -> bool:
    """Whether ``game`` can be played here (the benchmark with ``--data`` runs without procgen and
    gymnasium, e.g. on a GPU machine)."""
    try:
        import gymnasium  # noqa: F401
        if game not in SANITY_GAMES:
            import procgen  # noqa: F401
    except ImportError:
        return False
    return True


def real_probe(game: str, mode: str, num_levels: int, seed: int) -> dict | None:
    """States to set the dreams beside the real game from (``spread_ratio``): ``PROBE_STATES``
    unseen-level envs played ``PROBE_STEPS`` steps with seeded random actions. Returns the frames,
    actions and episode starts that lead there (the model observes them to reach each state), the
    ``PROBE_LATER`` random actions that follow each first action, and the game's (K, 15) returns
    of each first action from each state (rewards until the episode ends). None, said in one line,
    where procgen is missing."""
    if not playable(game):
        print(f"[{game}] the game cannot be played here (no procgen or gymnasium): the dream-against-game "
              "columns (aspr, acor) are skipped")
        return None
    from datamodules.procgen import vector_env
    k, a, rng = PROBE_STATES, 15, np.random.default_rng(seed + 17)
    args = (unseen_mode(mode), 1_000_000, num_levels)
    env = vector_env(game, k, *args, seed=seed + 2_000_017)
    obs, _ = env.reset()
    frames, actions, firsts, is_first = [], [], [], np.ones(k, bool)
    for t in range(PROBE_STEPS):
        frames.append(obs)
        firsts.append(is_first)
        actions.append(rng.integers(0, a, k))
        if t < PROBE_STEPS - 1:
            obs, _, terminated, truncated, _ = env.step(actions[-1])
            is_first = terminated | truncated
    states, later = env.get_state(), rng.integers(0, a, (k, PROBE_LATER))
    branches = vector_env(game, a, *args, seed=seed)
    game_returns = np.zeros((k, a))
    for i, state in enumerate(states):
        branches.set_state([state] * a)
        alive = np.ones(a, bool)
        for step_actions in [np.arange(a), *np.repeat(later[i][:, None], a, 1)]:
            _, reward, terminated, truncated, _ = branches.step(step_actions)
            game_returns[i] += alive * reward
            alive &= ~(terminated | truncated)
    env.close(), branches.close()
    return {"frames": np.stack(frames, 1), "action": np.stack(actions, 1), "is_first": np.stack(firsts, 1),
            "later": later, "game_returns": game_returns}


@torch.no_grad()
def dreams_against_game(wm, probe: dict) -> dict[str, float]:
    """``spread_ratio`` of the world model's imagined returns and the game's from the probe's states."""
    device = next(wm.parameters()).device
    to = lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(device)  # noqa: E731
    post, _ = wm.rssm.observe(wm.encoder(to(probe["frames"])), to(probe["action"]), to(probe["is_first"]))
    start = {k: v[:, -1] for k, v in post.items()}
    dream = dream_returns(wm, start, torch.arange(15, device=device), to(probe["later"]))
    return spread_ratio(dream.cpu().numpy(), probe["game_returns"])


def data_file(args: argparse.Namespace, game: str) -> Path:
    """The ``--data`` file of ``game``, checked to hold a dataset of that game in this format."""
    path = Path(args.data.format(game=game))
    if not path.is_file():
        raise ValueError(f"no dataset file {path}")
    try:
        with np.load(path) as f:
            meta = json.loads(str(f["meta"])) if "meta" in f.files else {}
    except Exception:  # not an .npz file at all: numpy raises several kinds
        meta = {}
    if meta.get("version") != FORMAT_VERSION or meta.get("game") != game:
        raise ValueError(f"{path} is not a world-model dataset of {game} (format {FORMAT_VERSION})")
    return path


def dataset(args: argparse.Namespace, game: str) -> dict[str, dict[str, np.ndarray]]:
    """{"train": arrays, "eval": arrays, "meta": ...}, collected or read from ``--data``."""
    if args.data:
        with np.load(data_file(args, game)) as f:
            data = {split: {k: f[f"{split}_{k}"] for k in (*FIELDS, "count")} for split in ("train", "eval")}
            data["meta"] = json.loads(str(f["meta"]))
        return data
    meta = {
        "version": FORMAT_VERSION, "game": game, "mode": args.mode, "num_levels": args.num_levels,
        "train_steps": args.train_steps, "eval_steps": args.eval_steps, "lanes": args.lanes,
        "seed": args.seed, "persist": args.persist,
    }
    t0 = time.perf_counter()
    data = {
        "train": collect(game, args.mode, 0, args.num_levels, args.lanes, args.train_steps,
                         args.seed, args.persist),
        # unseen levels: a disjoint seed range above the training levels
        "eval": collect(game, unseen_mode(args.mode), args.num_levels, 1_000_000, args.eval_lanes,
                        args.eval_steps, args.seed + 1_000_003, args.persist),
        "meta": meta,
    }
    print(f"[{game}] collected {int(data['train']['count'].sum())} training and "
          f"{int(data['eval']['count'].sum())} unseen-level steps in {time.perf_counter() - t0:.1f} s")
    if args.save_data:
        path = Path(args.save_data.format(game=game))
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {f"{split}_{k}": v for split in ("train", "eval") for k, v in data[split].items()}
        np.savez_compressed(path, meta=json.dumps(meta), **arrays)
        print(f"[{game}] dataset written to {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    return data


def train_replay(arrays: dict[str, np.ndarray], seed: int, latents: dict[str, int] | None) -> SequenceReplay:
    lanes, stored = arrays["action"].shape
    replay = SequenceReplay(lanes * stored, lanes, storage="ram", seed=seed, latents=latents)
    for k in FIELDS:
        replay.data[k][...] = arrays[k]
    replay.count[...] = arrays["count"]
    replay.size = np.minimum(replay.count, replay.lane_capacity)
    return replay


TRAIN_AUC_STEPS = 512  # steps per training-level lane scored for rAUCtr


def eval_lanes(arrays: dict[str, np.ndarray], most: int | None = None) -> dict[str, np.ndarray]:
    """Recorded lanes cut to a common length (at most ``most`` steps), flags unpacked."""
    length = min(int(arrays["count"].min()), most or 2**62)
    flags = arrays["flags"][:, :length]
    return {
        "frames": arrays["frames"][:, :length],
        "action": arrays["action"][:, :length].astype(np.int64),
        "reward": arrays["reward"][:, :length],
        "is_first": (flags & FIRST) > 0,
        "is_terminal": (flags & TERMINAL) > 0,
    }


def move(batch: dict, device: str) -> dict:
    return {k: move(v, device) if isinstance(v, dict) else v.to(device) for k, v in batch.items()}


def parse_pairs(pairs: list[str], what: str) -> dict:
    """``key=value`` pairs as a dict; a dotted key (``world_model.scale_dyn=0.5``) sets an entry of a group."""
    out: dict = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"{what} takes key=value pairs, got {pair!r}")
        value = yaml.safe_load(value)
        if isinstance(value, str):  # YAML 1.1 reads 3e-4 as a string
            try:
                value = float(value)
            except ValueError:
                pass
        group, dot, name = key.rpartition(".")
        target = out.setdefault(group, {}) if dot else out
        if not isinstance(target, dict):
            raise ValueError(f"{what} sets {group} both as a value and as a group, in {pair!r}")
        target[name or key] = value
    return out


HEADER = (f"{'upd':>6} {'min':>5} {'recon':>7} "
          + " ".join(f"{'skill_h' + str(h):>9}" for h in HORIZONS) + " "
          + " ".join(f"{'skillc_h' + str(h):>10}" for h in HORIZONS)
          + f" {'rAUC':>5} {'rAUCtr':>6} {'r+':>6} {'r-':>6} {'cAUC':>5} {'KL':>5} {'>free':>5} {'gain5':>6}"
          + f" {'aspr':>5} {'acor':>5} {'upd/s':>6}")


def row(r: dict) -> str:
    return (f"{r['updates']:>6} {r['minutes']:>5.1f} {r['recon_mse']:>7.4f} "
            + " ".join(f"{r[f'skill_h{h}']:>9.3f}" for h in HORIZONS) + " "
            + " ".join(f"{r[f'skill_changed_h{h}']:>10.3f}" for h in HORIZONS)
            + f" {r['reward_auc']:>5.2f} {r['reward_auc_train']:>6.2f} {r['reward_pos']:>6.2f} {r['reward_neg']:>6.2f}"
            + f" {r['cont_auc']:>5.2f} {r['kl']:>5.2f} {r['kl_above_free']:>5.2f} {r['action_gain_h5']:>6.3f}"
            + f" {r.get('spread_ratio', float('nan')):>5.2f} {r.get('action_corr', float('nan')):>5.2f}"
            + f" {r['updates_per_s']:>6.2f}")


def evaluate(wm, lanes: dict, args: argparse.Namespace, game: str, updates: int, train_time: float,
             updates_per_s: float, train_lanes: dict, probe: dict | None) -> dict:
    wm.eval()
    t_eval = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # the same latent samples at every evaluation
        torch.manual_seed(args.seed)
        result = {"game": game, "updates": updates, "minutes": train_time / 60, "updates_per_s": updates_per_s,
                  **posterior_quality(wm, lanes), **dream_quality(wm, lanes, context=args.context),
                  "reward_auc_train": posterior_quality(wm, train_lanes)["reward_auc"],
                  **(dreams_against_game(wm, probe) if probe is not None else {})}
    result["eval_s"] = time.perf_counter() - t_eval
    wm.train()
    print(row(result), flush=True)
    return result


def summary(game: str, result: dict) -> None:
    copy = " ".join(f"h{h} {result[f'copy_mse_h{h}']:.5f}" for h in HORIZONS)
    print(f"[{game}] copy-last-frame MSE: {copy}; {result['rewarded_steps']} rewarded and "
          f"{result['terminal_steps']} terminal steps, {int(result['windows'])} dream windows; "
          f"{result['eval_s']:.0f} s per evaluation")


def checkpoint_game(path: str, games: list[str]) -> None:
    """Refuses (ValueError) an unreadable checkpoint or one trained on another game."""
    saved = read_checkpoint(path).get("dreamer", {}).get("game")
    if saved is not None and games != [saved]:
        raise ValueError(f"{path} was trained on {saved}: give --games {saved}")


def evaluate_checkpoint(args: argparse.Namespace, game: str) -> list[dict]:
    """The world model of a training run's checkpoint, evaluated on this game's unseen-level data."""
    ckpt = read_checkpoint(args.checkpoint)
    agent, updates = restore_agent(ckpt, args.checkpoint), ckpt.get("dreamer", {}).get("updates", 0)
    wm = agent.world_model.to(args.device)
    data = dataset(args, game)
    lanes, train_lanes = eval_lanes(data["eval"]), eval_lanes(data["train"], TRAIN_AUC_STEPS)
    probe = real_probe(game, data["meta"]["mode"], data["meta"]["num_levels"], args.seed)
    print(f"\n[{game}] world model of {args.checkpoint} ({agent.hparams.size}, {updates} updates); "
          f"{lanes['action'].size} unseen-level steps")
    print(HEADER)
    result = evaluate(wm, lanes, args, game, updates, 0.0, float("nan"), train_lanes, probe)
    summary(game, result)
    return [result]


def run_game(args: argparse.Namespace, game: str, model_kwargs: dict) -> list[dict]:
    if args.checkpoint:
        return evaluate_checkpoint(args, game)
    data = dataset(args, game)
    if args.updates == 0 and args.minutes is None:
        return []
    lanes, train_lanes = eval_lanes(data["eval"]), eval_lanes(data["train"], TRAIN_AUC_STEPS)
    probe = real_probe(game, data["meta"]["mode"], data["meta"]["num_levels"], args.seed)
    torch.manual_seed(args.seed)
    agent = Dreamer(**model_kwargs)
    context = args.replay_context == "on"
    replay = train_replay(data["train"], args.seed, agent.latent_sizes if context else None)
    wm = agent.world_model.to(args.device)
    opt = agent.configure_optimizers()[0]
    clip = agent.hparams.world_model["clip"] if agent.hparams.optimizer["kind"] == "adam" else float("inf")  # LaProp: agc
    if args.minutes is not None:
        marks = [args.minutes * 60 * (k + 1) / args.evals for k in range(args.evals)]
    else:
        marks = [round(args.updates * (k + 1) / args.evals) for k in range(args.evals)]
    params = sum(p.numel() for p in wm.parameters())
    print(f"\n[{game}] world model {params / 1e6:.2f}M params, {agent.hparams.size} "
          f"{agent.hparams.overrides or ''}, batch {args.batch} x {args.seq_len}, precision {args.precision}, replay context "
          f"{args.replay_context}; "
          f"{lanes['action'].size} unseen-level steps, {int(lanes['reward'].__gt__(0).sum())} rewarded, "
          f"{int(lanes['is_terminal'].sum())} terminal")
    print(HEADER)
    autocast = torch.autocast(torch.device(args.device).type, torch.bfloat16, enabled=args.precision == "bf16")
    results, updates, train_time = [], 0, 0.0
    for mark in marks:
        t0 = time.perf_counter()
        u0, elapsed0 = updates, train_time
        while (train_time + time.perf_counter() - t0 < mark) if args.minutes is not None else updates < mark:
            sample = replay.sample(args.batch, args.seq_len + context)
            batch = move(replay_batch(sample, context), args.device)
            with autocast:
                loss, _, post = wm.loss(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(wm.parameters(), clip)
            opt.step()
            if context:
                store_posteriors(replay, batch, post)
            updates += 1
        train_time = elapsed0 + time.perf_counter() - t0
        speed = (updates - u0) / max(train_time - elapsed0, 1e-9)
        results.append(evaluate(wm, lanes, args, game, updates, train_time, speed, train_lanes, probe))
    summary(game, results[-1])
    return results


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--games", nargs="+", default=["coinrun", "starpilot", "chaser", "bigfish"])
    parser.add_argument("--size", default="small", help=f"one of {', '.join(SIZES)}")
    parser.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="size entries, e.g. deter=512 stoch=32")
    parser.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Dreamer arguments, e.g. world_model.lr=3e-4 world_model.scale_dyn=1.0 (a dotted key sets one knob of a section)")
    parser.add_argument("--updates", type=int, default=1000, help="training budget in updates")
    parser.add_argument("--minutes", type=float, default=None, help="training budget in minutes (wins over --updates)")
    parser.add_argument("--evals", type=int, default=4, help="evaluation points along the budget")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--context", type=int, default=16, help="real frames before each dream")
    parser.add_argument("--train-steps", type=int, default=64_000)
    parser.add_argument("--eval-steps", type=int, default=16_000)
    parser.add_argument("--lanes", type=int, default=16, help="training-level envs")
    parser.add_argument("--eval-lanes", type=int, default=16, help="unseen-level envs")
    parser.add_argument("--mode", default="easy")
    parser.add_argument("--num-levels", type=int, default=200)
    parser.add_argument("--persist", type=float, default=0.75, help="probability of repeating the last action")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--replay-context", choices=("on", "off"), default="on",
                        help="start sequences from the latents stored by earlier updates (DreamerV3)")
    parser.add_argument("--data", help="read the dataset from this file ({game} is replaced)")
    parser.add_argument("--checkpoint", help="evaluate the world model of this training checkpoint "
                        "on the unseen-level data instead of training one")
    parser.add_argument("--save-data", help="write the dataset to this .npz file ({game} is replaced)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32", help="training precision")
    parser.add_argument("--json", help="write every evaluation as JSON lines to this file")
    args = parser.parse_args(argv)

    for game in args.games:
        if game not in GAMES and game not in SANITY_GAMES:
            parser.error(f"unknown game {game!r}; allowed: {', '.join(GAMES)}, or a sanity task: {', '.join(SANITY_GAMES)}")
    if any(args.mode not in MODES.get(g, ("easy",)) for g in args.games):
        parser.error(f"distribution mode {args.mode!r} is not available for every game in {args.games}")
    if args.size not in SIZES:
        parser.error(f"unknown size {args.size!r}; allowed: {', '.join(SIZES)}")
    for name in ("evals", "batch", "seq_len", "lanes", "eval_lanes", "num_levels"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.updates < 0 or (args.minutes is not None and args.minutes <= 0):
        parser.error("--updates must be >= 0 and --minutes > 0")
    if not 0 <= args.persist < 1:
        parser.error("--persist must be in [0, 1)")
    if args.train_steps < args.lanes * (args.seq_len + 1) or args.eval_steps < args.eval_lanes * (args.context + 16):
        parser.error("--train-steps must give every lane at least seq_len steps, and --eval-steps "
                     "every unseen lane at least context + 16")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model_kwargs = {"size": args.size, "overrides": parse_pairs(args.overrides, "--overrides") or None,
                        **parse_pairs(args.model, "--model")}
        Dreamer(**model_kwargs)  # refuse bad arguments before collecting anything
        if args.checkpoint:
            checkpoint_game(args.checkpoint, args.games)
        for game in args.games if args.data else ():
            data_file(args, game)
    except (TypeError, ValueError) as e:
        parser.error(str(e).splitlines()[0])
    results = []
    for game in args.games:
        results += run_game(args, game, model_kwargs)
    if args.json:
        with open(args.json, "a") as f:
            for r in results:
                f.write(json.dumps({**r, "size": args.size, "overrides": args.overrides,
                                    "model": args.model, "precision": args.precision}) + "\n")
    return results


if __name__ == "__main__":
    main()
