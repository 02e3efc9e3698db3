"""Training through Lightning with ``model.cuda_graph``, end to end, on fake batches (the GPU
machines have no procgen): for each precision, ``--updates`` graphed updates, a checkpoint, the
run resumed eagerly from it, then resumed graphed again; Lightning must count three optimiser
steps per update throughout, every loss must be finite, and the graphed updates' seconds per
update (after the capture) are printed next to the eager ones of the same fit.

    python benchmarks/gpu_fit_check.py                        # on a GPU: graphed, eager, graphed
    python benchmarks/gpu_fit_check.py --device cpu --size tiny --batch 2 --seq 8   # eager only (the test)
"""
import argparse
import logging
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.agent_speed import fake_batch  # noqa: E402
from dreamer.agent import Dreamer  # noqa: E402


class UpdateTimes(pl.Callback):
    """Wall time and loss of every training step."""

    def __init__(self) -> None:
        self.seconds, self.losses, self._start = [], [], 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds.append(time.perf_counter() - self._start)
        self.losses.append(float(outputs["loss"]))


def fit(args, precision: str, graphed: bool, steps: int, ckpt: Path | None, save: Path) -> tuple[Dreamer, UpdateTimes, pl.Trainer]:
    torch.manual_seed(0)
    model = Dreamer(size=args.size, cuda_graph=graphed)
    times = UpdateTimes()
    trainer = pl.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=precision,
                         max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[times], num_sanity_val_steps=0)
    data = torch.utils.data.DataLoader([fake_batch(args.batch, args.seq, torch.device("cpu"))] * args.updates,
                                       batch_size=None)
    trainer.fit(model, train_dataloaders=data, ckpt_path=str(ckpt) if ckpt else None)
    trainer.save_checkpoint(save)
    return model, times, trainer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--size", default="small")
    parser.add_argument("--updates", type=int, default=8, help="per fit (the graph captures at the fourth)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--precisions", nargs="+", default=["32-true", "bf16-mixed"])
    args = parser.parse_args()
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    graph = args.device == "cuda"
    ok = True
    print(f"Lightning fit on fake batches, {args.size}, batch {args.batch} x {args.seq}, {args.updates} updates "
          f"per fit, device {args.device}; modes: {'graphed, eager, graphed' if graph else 'eager, eager, eager'}")
    print(f"{'precision':<11} {'fit':<22} {'global_step':>11} {'updates':>8} {'finite':>7} {'s/update':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for precision in args.precisions:
            ckpt = None
            for i, mode in enumerate((graph, False, graph)):
                save = Path(tmp) / f"{precision}-{i}.ckpt"
                steps = 3 * args.updates * (i + 1)  # world model, actor and critic steps
                model, times, trainer = fit(args, precision, mode, steps, ckpt, save)
                finite = all(torch.isfinite(torch.tensor(times.losses)))
                settled = times.seconds[4:] or times.seconds
                right = trainer.global_step == steps and model.updates == args.updates * (i + 1) and finite
                ok &= right
                name = ("graphed" if mode else "eager") + (" from scratch" if ckpt is None else " resumed")
                print(f"{precision:<11} {name:<22} {trainer.global_step:>11} {model.updates:>8} {str(finite):>7} "
                      f"{sum(settled) / len(settled):>9.3f}" + ("" if right else "   WRONG"))
                ckpt = save
    print("OK" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
