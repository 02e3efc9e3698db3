"""Updates/s, env steps/s (acting with the agent), peak memory and parameter counts per model size.

    python benchmarks/agent_speed.py [--sizes tiny 12M 25M] [--batch 16] [--seq 64] [--updates 5]
                                     [--precision 32|bf16] [--compile] [--cuda-graph] [--floor]
                                     [--act-plans 0 16 64]

One update = ``Dreamer.loss`` (world-model loss on B x T replayed steps, 15-step imagination from
every posterior state, actor and critic losses), one backward, clipping and three optimiser steps:
``dreamer.update.update``, what ``Dreamer.training_step`` runs. Acting = ``Dreamer.act`` on 16 procgen envs.

``--act-plans`` adds acting toward goals with the matcher alone (w = 1): for each P, env steps/s
when every action is chosen in P dreams (``model.goals.plan``; 0: the matcher samples), and that
over the actor acting alone.

``--floor`` adds the FLOP floor: the FLOPs of one whole update (``torch.utils.flop_counter``)
divided by the sustained rate of one large matmul in the same precision on the same threads,
measured in the same run; "x floor" is seconds per update over that floor. The FLOP floor
ignores memory traffic, which bounds the small presets, so it also prints the roofline floor:
each operator of the update at the roofline, max(its FLOPs / that matmul rate, the bytes of its
tensor inputs and outputs / the rate of one large tensor copy), summed ("roof s", with the GB
moved); "x roof" is seconds per update over that. Fusing operators (``--compile``) lowers the
bytes really moved, so the roofline floor is the eager update's, not the fastest possible.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.world_model_quality import parse_pairs  # noqa: E402
from dreamer.agent import Dreamer  # noqa: E402
from dreamer.goals import GoalDreamer  # noqa: E402
from dreamer.update import GraphedUpdate, compile_update, set_capturable, update  # noqa: E402


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM; unlike ru_maxrss it is not inherited over exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def sustained_rate(step, work: float, device, seconds: float = 1.0) -> float:
    """``work`` per second of repeating ``step()`` for ``seconds`` (after one warm-up call)."""
    step()
    reps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        reps += 1
    return work * reps / (time.perf_counter() - start)


def matmul_gflops(device, precision: str = "32", n: int = 2048, seconds: float = 1.0) -> float:
    """Sustained GFLOP/s of an n x n matmul (the device's best case for dense work)."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return sustained_rate(lambda: a @ b, 2 * n**3 / 1e9, device, seconds)


def memory_gbps(device, mb: int = 256, seconds: float = 1.0) -> float:
    """Sustained GB/s of copying one large float32 tensor into another (bytes read plus written)."""
    a = torch.randn(mb * 2**18, device=device)
    b = torch.empty_like(a)
    return sustained_rate(lambda: b.copy_(a), 2 * a.nbytes / 1e9, device, seconds)


def roofline(fn, gflops: float, gbps: float) -> dict[str, float]:
    """``fn()``'s operators (backward ones included) each at the roofline: seconds summed over
    operators of max(FLOPs / ``gflops``, bytes / ``gbps``), where bytes are the operator's tensor
    inputs and outputs (an unfused operator reads and writes each once; views move nothing).
    Also the GFLOP (as ``torch.utils.flop_counter`` counts them), the GB moved and the number of
    operators."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten
    from torch.utils.flop_counter import flop_registry

    totals = {"seconds": 0.0, "gflop": 0.0, "gb": 0.0, "ops": 0}

    class Roofline(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            if func.is_view:
                return out
            tensors = [t for t in tree_flatten((args, kwargs, out))[0] if isinstance(t, torch.Tensor)]
            nbytes = sum(t.numel() * t.element_size() for t in tensors)
            count = flop_registry.get(func._overloadpacket)
            flop = count(*args, **kwargs, out_val=out) if count else 0
            totals["seconds"] += max(flop / (gflops * 1e9), nbytes / (gbps * 1e9))
            totals["gflop"] += flop / 1e9
            totals["gb"] += nbytes / 1e9
            totals["ops"] += 1
            return out

    with Roofline():
        fn()
    return totals


def params(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


def fake_batch(batch: int, seq: int, device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "obs": torch.randint(0, 256, (batch, seq, 64, 64, 3), dtype=torch.uint8, generator=g).to(device),
        "action": torch.randint(0, 15, (batch, seq), generator=g).to(device),
        "reward": torch.rand(batch, seq, generator=g).to(device),
        "is_first": (torch.rand(batch, seq, generator=g) < 0.01).to(device),
        "is_last": torch.zeros(batch, seq, dtype=torch.bool).to(device),
        "is_terminal": (torch.rand(batch, seq, generator=g) < 0.01).to(device),
    }


def bench(size: str, batch: int, seq: int, updates: int, device, precision: str = "32",
          compile: bool = False, overrides: dict | None = None, act: bool = True,
          floor: bool = False, cuda_graph: bool = False, act_plans: tuple[int, ...] = (),
          **model_kwargs) -> dict[str, float]:
    torch.manual_seed(0)
    agent = GoalDreamer if act_plans else Dreamer  # acting toward goals needs the goal framework's
    model = agent(size=size, overrides=overrides or None, **model_kwargs).to(device)
    optimizers = model.configure_optimizers()[:3]  # world model, actor, critic
    data = fake_batch(batch, seq, device)
    if compile:
        compile_update(model)
    step = lambda: update(model, optimizers, data)  # noqa: E731
    if cuda_graph:
        set_capturable(optimizers)
        graphed = GraphedUpdate(model, optimizers)
        step = lambda: graphed(data)  # noqa: E731
    # bf16: autocast as Lightning's "bf16-mixed" does (fp32 weights, bf16 matmuls and convolutions)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(1 + (graphed.warmup if cuda_graph else 0)):
        with autocast:
            step()  # warm-up (and compilation, or the CUDA graph's capture)
    if device.type == "cuda":
        torch.cuda.synchronize()
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(updates):
        with autocast:
            step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    update_s = (time.perf_counter() - start) / updates

    act_steps_s = acting_speed(model) if act else float("nan")
    plan_steps_s = {f"env_steps_per_s_plan{p}": acting_speed(model, plan=p) for p in act_plans}
    rate, gbps = (matmul_gflops(device, precision), memory_gbps(device)) if floor else (float("nan"),) * 2
    roof = dict.fromkeys(("seconds", "gflop", "gb"), float("nan"))
    if floor:
        with autocast:
            roof = roofline(lambda: update(model, optimizers, data), rate, gbps)
    floor_s = roof["gflop"] / rate
    return {
        "gflop_per_update": roof["gflop"],
        "floor_s": floor_s,
        "times_floor": update_s / floor_s,
        "matmul_gflops": rate,
        "copy_gbps": gbps,
        "gb_moved_per_update": roof["gb"],
        "roofline_s": roof["seconds"],
        "times_roofline": update_s / roof["seconds"],
        "first_update_s": first_s,
        "updates_per_s": 1 / update_s,
        "seconds_per_update": update_s,
        "env_steps_per_s_acting": act_steps_s,
        **plan_steps_s,
        "world_model_M": params(model.world_model),
        "actor_M": params(model.actor_critic.actor),
        "critic_M": params(model.actor_critic.critic),
        "peak_rss_gb": peak_rss_gb(),
        "gpu_peak_gb": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0,
    }


def acting_speed(model: Dreamer, steps: int = 50, plan: int | None = None) -> float:
    """Env steps/s of ``Dreamer.act`` on 16 coinrun envs (procgen is imported only here: the GPU
    machines have none); with ``plan`` the matcher acts alone toward goals, choosing each action
    in that many dreams (0: by a sample)."""
    from datamodules.procgen import ProcgenVectorEnv

    env = ProcgenVectorEnv("coinrun", 16, num_levels=200, seed=0)
    obs, _ = env.reset()
    is_first, state = np.ones(16, bool), None
    if plan is not None:  # the matcher alone, choosing in ``plan`` dreams (0: sampling)
        before = model.goals.acting
        model.goals.acting = replace(before, mix_weight=1.0, plan=plan)
    start = time.perf_counter()
    try:
        for _ in range(steps):
            actions, state = model.act(torch.from_numpy(obs), torch.from_numpy(is_first), state)
            obs, _, term, trunc, _ = env.step(actions.numpy().astype(np.int64))
            is_first = term | trunc
    finally:
        env.close()
        if plan is not None:
            model.goals.acting = before
    return steps * 16 / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["tiny", "12M", "25M"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--updates", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("32", "bf16"), default="32")
    parser.add_argument("--compile", action="store_true", help="torch.compile networks and RSSM steps")
    parser.add_argument("--cuda-graph", action="store_true",
                        help="replay the whole update as one CUDA graph (dreamer.update.GraphedUpdate)")
    parser.add_argument("--no-act", dest="act", action="store_false", help="skip acting (needs procgen)")
    parser.add_argument("--floor", action="store_true", help="FLOPs per update and the FLOP floor")
    parser.add_argument("--act-plans", type=int, nargs="*", default=[], metavar="P",
                        help="also act toward goals with the matcher, choosing in P dreams (0: by a sample)")
    parser.add_argument("--overrides", nargs="*", default=[], metavar="KEY=VALUE",
                        help="size entries for every size, e.g. stoch=32 gru_blocks=8")
    parser.add_argument("--model", nargs="*", default=[], metavar="KEY=VALUE",
                        help="Dreamer arguments, e.g. norm=rms scale_dyn=0.5")
    args = parser.parse_args()
    try:
        overrides = parse_pairs(args.overrides, "--overrides")
        model_kwargs = parse_pairs(args.model, "--model")
    except ValueError as e:
        parser.error(str(e))
    device = torch.device(args.device)
    if args.cuda_graph and device.type != "cuda":
        parser.error(f"--cuda-graph needs --device cuda (got {device})")
    if any(p < 0 for p in args.act_plans):
        parser.error(f"--act-plans must be >= 0, got {args.act_plans}")
    if args.act_plans and not args.act:
        parser.error("--act-plans measures acting: leave out --no-act")
    print(f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"batch {args.batch} x {args.seq}, precision {args.precision}, compile {args.compile}, cuda graph {args.cuda_graph}, "
          f"overrides {overrides or '-'}, model {model_kwargs or '-'}")
    print(f"{'size':>6} {'first s':>8} {'upd/s':>8} {'s/upd':>8} {'act steps/s':>12} {'WM M':>7} {'actor M':>8} "
          f"{'critic M':>9} {'peak RSS GB':>12} {'GPU GB':>7}" + (f" {'GFLOP':>8} {'floor s':>8} {'x floor':>8} {'GB moved':>9} {'roof s':>7} {'x roof':>7}" if args.floor else ""))
    for size in args.sizes:
        try:
            r = bench(size, args.batch, args.seq, args.updates, device, args.precision, args.compile,
                      overrides, args.act, args.floor, args.cuda_graph, tuple(args.act_plans), **model_kwargs)
        except ValueError as e:  # the model refused a size, override or argument
            parser.error(str(e))
        print(f"{size:>6} {r['first_update_s']:>8.2f} {r['updates_per_s']:>8.3f} {r['seconds_per_update']:>8.3f} "
              f"{r['env_steps_per_s_acting']:>12.0f} {r['world_model_M']:>7.2f} {r['actor_M']:>8.2f} "
              f"{r['critic_M']:>9.2f} {r['peak_rss_gb']:>12.2f} {r['gpu_peak_gb']:>7.2f}"
              + (f" {r['gflop_per_update']:>8.1f} {r['floor_s']:>8.3f} {r['times_floor']:>8.1f}"
                 f" {r['gb_moved_per_update']:>9.1f} {r['roofline_s']:>7.3f} {r['times_roofline']:>7.1f}" if args.floor else ""),
              flush=True)
        if args.floor:
            print(f"{size:>6} floors from a {r['matmul_gflops']:.0f} GFLOP/s matmul and a {r['copy_gbps']:.1f} GB/s copy",
                  flush=True)
        for p in args.act_plans:
            speed = r[f"env_steps_per_s_plan{p}"]
            print(f"{size:>6} acting toward goals, matcher {'choosing in ' + str(p) + ' dreams' if p else 'sampling'}: "
                  f"{speed:.0f} env steps/s ({speed / r['env_steps_per_s_acting']:.2f}x the actor alone)", flush=True)


if __name__ == "__main__":
    main()
