"""Environment and replay throughput, replay bytes per step, and memory of a 1M-step memmap replay.

    python benchmarks/env_replay.py [--steps 3000] [--rounds 3] [--skip-rss]

Prints env steps/s of (a) raw procgen gym3, (b) ProcgenVectorEnv, (c) ReplayDataModule collection
with a random policy, all with 16 coinrun envs and random actions, measured in interleaved rounds
(medians), and the ratios b/a and c/a. (c) is given twice: "cold" writes into never-touched replay
memory (the first pass over the ring, which pays the OS's page allocation) and "warm" writes into a
ring that has been filled once (every later pass of a long run).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.agent_speed import peak_rss_gb  # noqa: E402
from datamodules.procgen import ProcgenVectorEnv, raw_procgen_env  # noqa: E402
from datamodules.replay import SequenceReplay  # noqa: E402
from datamodules.replay_datamodule import ReplayDataModule  # noqa: E402

N = 16


def raw_procgen(steps: int) -> float:
    # the same procgen seed as the wrapped envs below (seed=0), so all three play the same levels
    rand_seed = ProcgenVectorEnv("coinrun", 1, seed=0).rand_seed
    env = raw_procgen_env(num=N, env_name="coinrun", distribution_mode="easy",
                                 num_levels=200, start_level=0, rand_seed=rand_seed)
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps):
        env.act(rng.integers(0, 15, N).astype(np.int32))
        env.observe()
    return steps * N / (time.perf_counter() - start)


def vector_env(steps: int) -> float:
    env = ProcgenVectorEnv("coinrun", N, "easy", num_levels=200, seed=0)
    env.reset()
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    for _ in range(steps):
        env.step(rng.integers(0, 15, N))
    return steps * N / (time.perf_counter() - start)


def datamodule(steps: int, warm: bool) -> float:
    dm = ReplayDataModule(game="coinrun", num_envs=N, num_levels=200, learning_starts=10**12,
                          replay_capacity=N * steps)
    dm.setup("fit")
    if warm:
        dm.collector.collect(dm.policy, steps)  # one full pass over the ring
    start = time.perf_counter()
    dm.collector.collect(dm.policy, steps)
    return steps * N / (time.perf_counter() - start)


def rss_child(directory: str, capacity: int) -> None:
    """Fill a memmap replay of ``capacity`` steps and sample from it; print the peak RSS."""
    base = peak_rss_gb()
    replay = SequenceReplay(capacity, N, storage="memmap", directory=directory, seed=0)
    pool = np.random.default_rng(0).integers(0, 256, (64, N, 64, 64, 3), dtype=np.uint8)
    zeros = np.zeros(N, bool)
    start = time.perf_counter()
    for i in range(capacity // N):
        replay.add(pool[i % 64], np.full(N, i % 15), np.ones(N, np.float32), zeros, zeros, zeros)
    fill_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(100):
        replay.sample(16, 64)
    sample_s = (time.perf_counter() - start) / 100
    print(f"{len(replay)} {fill_s:.1f} {sample_s * 1e3:.1f} {base:.3f} {peak_rss_gb():.3f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=3000, help="vector steps per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rss-capacity", type=int, default=1_000_000)
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--rss-child", nargs=2, metavar=("DIR", "CAPACITY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(args.rss_child[0], int(args.rss_child[1]))
        return

    runs = {"a": [], "b": [], "c_cold": [], "c_warm": []}
    for _ in range(args.rounds):
        runs["a"].append(raw_procgen(args.steps))
        runs["b"].append(vector_env(args.steps))
        runs["c_cold"].append(datamodule(args.steps, warm=False))
        runs["c_warm"].append(datamodule(args.steps, warm=True))
    med = {k: float(np.median(v)) for k, v in runs.items()}
    print(f"env steps/s, 16 coinrun envs, random actions, median of {args.rounds} rounds")
    print(f"  (a) raw procgen gym3           {med['a']:>10,.0f}")
    print(f"  (b) ProcgenVectorEnv           {med['b']:>10,.0f}   b/a = {med['b'] / med['a']:.3f}  (target >= 0.95)")
    print(f"  (c) DataModule, warm replay    {med['c_warm']:>10,.0f}   c/a = {med['c_warm'] / med['a']:.3f}  (target >= 0.8)")
    print(f"      DataModule, cold replay    {med['c_cold']:>10,.0f}   c/a = {med['c_cold'] / med['a']:.3f}  (first pass over fresh memory)")

    frame = 64 * 64 * 3
    bps = SequenceReplay(N * 1000, N).bytes_per_step
    print(f"replay bytes per stored step     {bps:,.0f}   = {bps / frame:.4f} x 12,288  (target <= 1.02)")

    if not args.skip_rss:
        with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parents[1]) as tmp:
            out = subprocess.run(
                [sys.executable, __file__, "--rss-child", tmp, str(args.rss_capacity)],
                capture_output=True, text=True, check=True,
            ).stdout.split()
        steps, fill_s, sample_ms, base_gb, peak_gb = out
        print(f"memmap replay of {int(steps):,} steps: filled in {fill_s} s, "
              f"one 16x64 batch in {sample_ms} ms")
        print(f"  peak RSS {float(peak_gb):.3f} GB (process before the replay: {float(base_gb):.3f} GB)"
              f"  (target < 1.5 GB)")


if __name__ == "__main__":
    main()
