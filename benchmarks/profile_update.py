"""Where one update's time goes: world model, imagination, actor-critic, backward and optimiser
steps, and the dream phases, per model size; and how much of it is Python rather than tensor ops.

    python benchmarks/profile_update.py [--sizes tiny 12M] [--batch 16] [--seq 64] [--updates 3]

Phases are timed with the device synchronised at each boundary. "ops" is the summed self time
of the tensor operators that torch.profiler records for one whole update; "python" is the rest
of that update's wall time: the interpreter and dispatch overhead between operators. On a GPU,
"ops" is the time its kernels ran, so "python" is the time the GPU waited for the host.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.agent_speed import fake_batch  # noqa: E402
from callbacks.dreams import BridgeDistillation, DreamGeneration  # noqa: E402
from dreamer.agent import Dreamer  # noqa: E402
from dreamer.update import params_of, update  # noqa: E402

PHASES = ("world_model", "imagination", "actor_critic", "backward_and_steps", "dream_generation",
          "distillation")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_update(model: Dreamer, optimizers, batch, dreams: DreamGeneration, bridge: BridgeDistillation,
                 device) -> dict[str, float]:
    out, hp = {}, model.hparams

    def mark(name, start):
        sync(device)
        now = time.perf_counter()
        out[name] = now - start
        return now

    t = time.perf_counter()
    wm_loss, _, post = model.world_model.loss(batch)
    t = mark("world_model", t)
    imagined = model.imagine(post, batch["is_terminal"])
    t = mark("imagination", t)
    ac_loss, _ = model.actor_critic.loss(*imagined)
    t = mark("actor_critic", t)
    for opt in optimizers[:3]:
        opt.zero_grad(set_to_none=True)
    (wm_loss + ac_loss).backward()
    for opt, clip in zip(optimizers[:3], (hp.world_model["clip"], hp.actor_critic["clip"], hp.actor_critic["clip"])):
        torch.nn.utils.clip_grad_norm_(params_of(opt), clip)
        opt.step()
    model.actor_critic.update_slow_critic()
    t = mark("backward_and_steps", t)
    post = {k: v.detach() for k, v in post.items()}
    dreams.generate(model, post, batch["is_first"])
    t = mark("dream_generation", t)
    bridge.distil(model, dreams.buffer.states(bridge.batch_size), 1.0)
    mark("distillation", t)
    return out


def profile_size(size: str, batch_size: int, seq: int, updates: int, device) -> dict[str, float]:
    torch.manual_seed(0)
    model = Dreamer(size=size).to(device)
    optimizers = model.configure_optimizers()
    model.optimizers = lambda: optimizers  # what the callbacks ask Lightning for
    dreams, bridge = DreamGeneration(), BridgeDistillation()
    batch = fake_batch(batch_size, seq, device)
    timed_update(model, optimizers, batch, dreams, bridge, device)  # warm-up, fills the dream buffer
    totals = dict.fromkeys(PHASES, 0.0)
    for _ in range(updates):
        for name, seconds in timed_update(model, optimizers, batch, dreams, bridge, device).items():
            totals[name] += seconds / updates
    gpu = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        update(model, optimizers[:3], batch)
        sync(device)
        wall = time.perf_counter() - start
    ops = sum(e.self_device_time_total if gpu else e.self_cpu_time_total
              for e in prof.key_averages()) / 1e6
    return {**totals, "update_wall": wall, "ops": ops, "python": max(0.0, wall - ops)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["tiny", "12M"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch} x {args.seq}; seconds per update")
    cols = (*PHASES, "update_wall", "ops", "python")
    print(f"{'size':>6} " + " ".join(f"{c:>18}" for c in cols))
    for size in args.sizes:
        r = profile_size(size, args.batch, args.seq, args.updates, device)
        print(f"{size:>6} " + " ".join(f"{r[c]:>18.3f}" for c in cols))


if __name__ == "__main__":
    main()
