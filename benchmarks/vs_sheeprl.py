"""Our DreamerV3 update against SheepRL's, at the same configuration, timed in one sitting.

    bash ../shared/bench/sheeprl/setup.sh      # once: SheepRL 0.8.4 in its own venv
    python benchmarks/vs_sheeprl.py [--venv /tmp/bench-sheeprl] [--rounds 2] [--updates 3]
                                    [--threads 2] [--precision 32|bf16] [--sheeprl-malloc default|kept]

The configuration is SheepRL's DreamerV3-XS as resolved by the harness (``$VENV/xs_config.yaml``):
our size overrides are read from it (recurrent state, dense units, MLP layers, latents, CNN
multiplier with SheepRL's channel multipliers 1, 2, 4, 8), batch 16 x 64, horizon 15. Rounds
alternate: our update ``--updates`` times in this process, then SheepRL's own ``train()`` the same
number of times in a subprocess (the harness's ``update_speed.py``; its warm-up update is not
timed, nor is ours). Ours keeps freed memory for reuse (``dreamer/memory.py``, unless
``DREAMER_KEEP_FREED_MEMORY=0``); ``--sheeprl-malloc kept`` gives SheepRL the same glibc settings
through the environment. Prints seconds per update of both per round, the ratio, and parameters per
module side by side. SheepRL stays out of the project's dependencies.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT.parent / "shared" / "bench" / "sheeprl"


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def xs_overrides(config: dict) -> dict:
    """Our size overrides for SheepRL's resolved DreamerV3 config."""
    wm, algo = config["algo"]["world_model"], config["algo"]
    mults = [1, 2, 4, 8]  # SheepRL's encoder and decoder: multiplier x (1, 2, 4, 8) channels
    return {
        "deter": wm["recurrent_model"]["recurrent_state_size"],
        "hidden": wm["recurrent_model"]["dense_units"],
        "stoch": wm["stochastic_size"],
        "classes": wm["discrete_size"],
        "depth": wm["encoder"]["cnn_channels_multiplier"],
        "cnn_mults": mults,
        "units": algo["dense_units"],
        "layers": algo["mlp_layers"],
        "gru_blocks": 1,
    }


def sheeprl(venv: Path, config: Path, mode: str, updates: int, threads: int, precision: str,
            malloc_env: dict[str, str]) -> dict:
    extra = ["--set", "fabric.precision=bf16-mixed"] if precision == "bf16" else []
    out = subprocess.run(
        [str(venv / "bin" / "python"), str(HARNESS / "update_speed.py"), str(config), mode, str(updates),
         "--threads", str(threads), *extra],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads), **malloc_env},
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
    if out.returncode != 0 or not lines:
        fail(f"SheepRL's harness failed ({mode}): {(out.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", type=Path, default=Path(os.environ.get("VENV", "/tmp/bench-sheeprl")))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", choices=("32", "bf16"), default="32")
    parser.add_argument("--sheeprl-malloc", choices=("default", "kept"), default="default",
                        help="kept: run SheepRL with the glibc malloc settings ours uses (dreamer/memory.py)")
    args = parser.parse_args()
    for name in ("rounds", "updates", "threads"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be a positive integer, got {getattr(args, name)}")
    config_path = args.venv / "xs_config.yaml"
    if not (args.venv / "bin" / "python").is_file() or not config_path.is_file():
        fail(f"no SheepRL venv with its resolved config at {args.venv}; "
             f"create it with: bash {HARNESS / 'setup.sh'} (VENV=<dir> to place it elsewhere)")

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    import yaml

    sys.path.insert(0, str(ROOT))
    from benchmarks.agent_speed import fake_batch
    from dreamer.agent import Dreamer
    from dreamer.memory import GLIBC_ENV, keep_freed_memory
    from dreamer.update import update

    torch.set_num_threads(args.threads)
    config = yaml.safe_load(config_path.read_text())
    batch, seq = config["algo"]["per_rank_batch_size"], config["algo"]["per_rank_sequence_length"]
    overrides = xs_overrides(config)
    torch.manual_seed(0)
    model = Dreamer(size="tiny", overrides=overrides, actor_critic={"horizon": config["algo"]["horizon"]})
    optimizers = model.configure_optimizers()[:3]
    data = fake_batch(batch, seq, torch.device("cpu"))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def ours(n: int) -> list[float]:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            with autocast:
                update(model, optimizers, data)
            times.append(time.perf_counter() - start)
        return times

    malloc_env = GLIBC_ENV if args.sheeprl_malloc == "kept" else {}
    print(f"torch {torch.__version__}, {args.threads} threads, precision {args.precision}, batch "
          f"{batch} x {seq}, horizon {config['algo']['horizon']}; our overrides {overrides}")
    print(f"malloc: ours {'kept' if keep_freed_memory() else 'default'} (dreamer/memory.py), "
          f"SheepRL {args.sheeprl_malloc}")
    ours(1)  # warm-up, as the harness does
    rows = []
    for r in range(args.rounds):
        mine = statistics.median(ours(args.updates))
        theirs = sheeprl(args.venv, config_path, "time", args.updates, args.threads, args.precision,
                         malloc_env)["median_s"]
        rows.append((mine, theirs))
        print(f"round {r + 1}: ours {mine:.3f} s/update, SheepRL {theirs:.3f} s/update, "
              f"ours / SheepRL {mine / theirs:.2f}", flush=True)
    mine, theirs = (statistics.median(x) for x in zip(*rows))
    print(f"\nmedian over rounds: ours {mine:.3f} s, SheepRL {theirs:.3f} s per update; "
          f"SheepRL / ours = {theirs / mine:.2f}x ({'ours faster' if mine < theirs else 'SheepRL faster'})")

    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6  # noqa: E731
    wm = model.world_model
    their = sheeprl(args.venv, config_path, "params", 1, args.threads, args.precision, malloc_env)
    table = [
        ("world model", count(wm), their["world_model"]),
        ("encoder", count(wm.encoder), their["encoder"]),
        ("rssm", count(wm.rssm), their["rssm"]),
        ("decoder", count(wm.decoder), their["decoder"]),
        ("reward head", count(wm.reward_head), their["reward_head"]),
        ("continue head", count(wm.continue_head), their["continue_head"]),
        ("actor", count(model.actor_critic.actor), their["actor"]),
        ("critic", count(model.actor_critic.critic), their["critic"]),
    ]
    print(f"\n{'parameters (M)':<16}{'ours':>8}{'SheepRL':>9}")
    for name, a, b in table:
        print(f"{name:<16}{a:>8.2f}{b / 1e6:>9.2f}")


if __name__ == "__main__":
    main()
