"""Does the world model see the game's rewards and episode ends? Reads a checkpoint and its replay.

    python experiments/world_model_probe.py runs/<name>/checkpoints/last.ckpt [--batches 20]

On replayed sequences it prints the reward the world model predicts from the posterior, grouped by
the real reward, its continue probability on terminal and other steps, and how well each separates
(ROC AUC: rewarded vs unrewarded steps, non-terminal vs terminal steps). A model that predicts the
same reward everywhere cannot teach the actor anything, whatever the actor-critic does.
Needs a checkpoint with an in-RAM replay, or a memory-mapped one whose files are still in place.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datamodules.replay import SequenceReplay  # noqa: E402
from datamodules.replay import replay_batch  # noqa: E402
from dreamer.agent import Dreamer  # noqa: E402
from dreamer.checkpoints import CheckpointError, read_checkpoint, restore_agent  # noqa: E402
from dreamer.quality import roc_auc  # noqa: E402


def load(path: str, ckpt: dict | None = None) -> tuple[Dreamer, SequenceReplay]:
    """The Dreamer and the replay saved in the checkpoint at ``path`` (``ckpt``: already read)."""
    try:
        ckpt = ckpt or read_checkpoint(path)
        model = restore_agent(ckpt, path)
    except CheckpointError as e:
        sys.exit(f"error: {e}")
    if "ReplayDataModule" not in ckpt:
        sys.exit(f"error: {path} holds no replay (it was not written by `cli.py fit`)")
    data_state = ckpt["ReplayDataModule"]
    rank0 = Path(ckpt.get("datamodule_hyper_parameters", {}).get("replay_dir") or "replay") / "rank0"
    if "rank_state" in data_state:  # a DDP run: every rank's replay state is a file beside its replay
        try:
            data_state = torch.load(rank0 / data_state["rank_state"], map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as e:
            sys.exit(f"error: rank 0's replay state of this DDP checkpoint is not readable in {rank0} ({e})")
    replay_state = data_state["replay"]
    if replay_state is None:
        sys.exit(f"error: {path} was saved before its replay held any steps")
    lanes, per_lane = replay_state["num_lanes"], replay_state["lane_capacity"]
    directory = rank0 if replay_state["storage"] == "memmap" else None  # where the run wrote its files
    replay = SequenceReplay(per_lane * lanes, lanes, storage=replay_state["storage"], directory=directory,
                            seed=0, latents=replay_state.get("latents"))
    replay.load_state_dict(replay_state)
    return model, replay


@torch.no_grad()
def probe(model: Dreamer, replay: SequenceReplay, batches: int = 20, batch_size: int = 16,
          seq_len: int = 32) -> dict:
    """{"reward": {real reward: (steps, mean predicted)}, "continue": (at terminals, elsewhere),
    "reward_auc": rewarded vs unrewarded, "continue_auc": non-terminal vs terminal}."""
    wm = model.world_model
    real, pred, term, cont = [], [], [], []
    for _ in range(batches):
        batch = replay_batch(replay.sample(batch_size, seq_len))
        _, _, post = wm.loss(batch)
        feat = wm.rssm.features(post)
        real.append(batch["reward"].flatten())
        pred.append(wm.reward(feat).flatten())
        term.append(batch["is_terminal"].flatten())
        cont.append(wm.continue_prob(feat).flatten())
    real, pred, term, cont = map(torch.cat, (real, pred, term, cont))
    rewards = {float(v): (int((real == v).sum()), float(pred[real == v].mean())) for v in real.unique()}
    nan = float("nan")
    return {
        "reward": rewards,
        "continue": (float(cont[term].mean()) if term.any() else nan,
                     float(cont[~term].mean()) if (~term).any() else nan),
        "reward_auc": roc_auc(pred.numpy(), (real > 0).numpy()),
        "continue_auc": roc_auc(cont.numpy(), (~term).numpy()),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--batches", type=int, default=20)
    args = parser.parse_args(argv)
    if args.batches < 1:
        parser.error("--batches must be >= 1")
    model, replay = load(args.checkpoint)
    out = probe(model, replay, args.batches)
    print(f"{'real reward':>12} {'steps':>8} {'predicted':>10}")
    for value, (n, mean) in sorted(out["reward"].items()):
        print(f"{value:>12.3f} {n:>8} {mean:>10.3f}")
    at_end, elsewhere = out["continue"]
    print(f"continue probability: {at_end:.3f} on terminal steps, {elsewhere:.3f} elsewhere")
    print(f"ROC AUC: reward {out['reward_auc']:.3f} (rewarded vs other steps), continue "
          f"{out['continue_auc']:.3f} (other vs terminal steps)")


if __name__ == "__main__":
    main()
