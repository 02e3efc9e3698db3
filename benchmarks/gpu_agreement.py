"""Does the GPU compute the same update as the CPU? One world-model and actor-critic loss of the
``small`` agent on a fixed fake batch, on the CPU and on ``--device``, with the same weights and
the same sampling noise, compared loss by loss; then the loss under bf16 autocast must be finite; then
(on CUDA) ``--graph-updates`` updates replayed as one CUDA graph (``GraphedUpdate``) against the
same updates run eagerly from the same weights, seed and batch.

The two devices' random streams differ, so every ``torch.rand`` draw (the only source of noise in
``Dreamer.loss``: latent and action samples, ``dreamer.distributions.sample_index``) is taken
from the seeded CPU stream and moved to the device. TF32 is switched off (cuDNN convolutions use it
by default), so fp32 means fp32 on both sides.
    python benchmarks/gpu_agreement.py --device cuda
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.agent_speed import fake_batch  # noqa: E402
from dreamer.agent import Dreamer  # noqa: E402
from dreamer.update import GraphedUpdate, set_capturable, update  # noqa: E402

TOLERANCE = 1e-3


def losses_on(where: str, size: str) -> dict[str, float]:
    torch.manual_seed(0)
    model = Dreamer(size=size).to(where)
    batch = fake_batch(16, 64, torch.device(where))
    torch.manual_seed(1)
    _, metrics = model.loss(batch)
    return {k: float(v) for k, v in metrics.items() if k.startswith("loss/")}


def relative_differences(cpu: dict[str, float], dev: dict[str, float]) -> dict[str, float]:
    """|cpu - dev| / max(|cpu|, 0.1) per loss: relative, and absolute for near-zero losses (the
    actor loss is ~1e-4 at initialisation)."""
    return {k: abs(cpu[k] - dev[k]) / max(abs(cpu[k]), 0.1) for k in sorted(cpu)}


def loss_trajectory(device: str, size: str, updates: int, graphed: bool) -> list[dict[str, float]]:
    """Losses of ``updates`` updates on one fixed batch, eager or through ``GraphedUpdate`` (whose
    first ``warmup`` updates are eager)."""
    torch.manual_seed(0)
    model = Dreamer(size=size).to(device)
    optimizers = model.configure_optimizers()[:3]
    batch = fake_batch(16, 64, torch.device(device))
    set_capturable(optimizers)  # in both runs: the same Adam arithmetic
    step = lambda: update(model, optimizers, batch)  # noqa: E731
    if graphed:
        graph = GraphedUpdate(model, optimizers)
        step = lambda: graph(batch)  # noqa: E731
    torch.manual_seed(1)
    out = []
    for _ in range(updates):
        _, metrics = step()
        out.append({k: float(v) for k, v in metrics.items() if k.startswith("loss/")})
    return out


def graph_check(device: str, size: str, updates: int) -> bool:
    eager = loss_trajectory(device, size, updates, graphed=False)
    graphed = loss_trajectory(device, size, updates, graphed=True)
    worst = 0.0
    print(f"update  {'eager loss/world_model':>22} {'graphed':>12} {'eager loss/image':>17} {'graphed':>12}  largest rel. diff (any loss)")
    for i, (e, g) in enumerate(zip(eager, graphed), 1):
        diffs = relative_differences(e, g)
        worst = max(worst, max(diffs.values()))
        print(f"{i:>6}  {e['loss/world_model']:>22.4f} {g['loss/world_model']:>12.4f} {e['loss/image']:>17.4f} "
              f"{g['loss/image']:>12.4f}  {max(diffs.values()):.1e} ({max(diffs, key=diffs.get)})")
    agree = worst < TOLERANCE  # the graph replays the same random stream: the same updates
    print(f"CUDA graph against eager, {updates} updates: every loss within {worst:.1e}: "
          f"{'OK' if agree else 'MISMATCH'} (tolerance {TOLERANCE:g})")
    return agree


def cpu_noise(rand):
    """``torch.rand`` drawn from the CPU stream and moved to the requested device."""
    def draw(*size, device=None, **kwargs):
        return rand(*size, **kwargs).to(device) if device is not None else rand(*size, **kwargs)
    return draw


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--size", default="small")
    parser.add_argument("--graph-updates", type=int, default=10, help="0 skips the CUDA graph check")
    args = parser.parse_args()
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    rand, torch.rand = torch.rand, cpu_noise(torch.rand)
    try:
        cpu, dev = losses_on("cpu", args.size), losses_on(args.device, args.size)
    finally:
        torch.rand = rand
    differences = relative_differences(cpu, dev)
    for k, diff in differences.items():
        print(f"{k:<22} cpu {cpu[k]:>12.5f}  {args.device} {dev[k]:>12.5f}  rel {diff:.1e}")
    worst = max(differences.values())
    agree = worst < TOLERANCE
    print(f"largest relative difference {worst:.2e}: {'OK' if agree else 'MISMATCH'} (tolerance {TOLERANCE:g})")
    torch.manual_seed(0)
    model = Dreamer(size=args.size).to(args.device)
    with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
        loss, _ = model.loss(fake_batch(16, 64, torch.device(args.device)))
    loss = loss.detach()
    finite = bool(torch.isfinite(loss))
    print(f"bf16-mixed loss {float(loss):.4f}: {'finite' if finite else 'NOT FINITE'}")
    graph_ok = True
    if args.graph_updates and torch.device(args.device).type == "cuda":
        graph_ok = graph_check(args.device, args.size, args.graph_updates)
    return 0 if agree and finite and graph_ok else 1


if __name__ == "__main__":
    sys.exit(main())
