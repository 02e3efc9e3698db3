"""Mixed precision (bf16 autocast, as Lightning's bf16-mixed) and the torch.compile option."""

import pytest
import torch

from benchmarks.agent_speed import fake_batch
from dreamer.agent import Dreamer


def losses(model, batch, autocast: bool):
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss, metrics = model.loss(batch)
    return loss, metrics


def test_bf16_autocast_loss_and_gradients_are_finite_and_close_to_fp32():
    torch.manual_seed(0)
    model = Dreamer(size="tiny")
    batch = fake_batch(4, 16, torch.device("cpu"))
    ref, ref_metrics = losses(model, batch, autocast=False)
    loss, metrics = losses(model, batch, autocast=True)
    assert loss.dtype == torch.float32, "losses are accumulated in float32 under autocast"
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    # bf16 really ran (the numbers differ), and its matmuls keep the image term within a percent
    assert float(metrics["loss/image"]) != float(ref_metrics["loss/image"])
    assert float(metrics["loss/image"]) == pytest.approx(float(ref_metrics["loss/image"]), rel=0.01)
    assert float(loss) == pytest.approx(float(ref), rel=0.02)


def test_compile_option_keeps_parameter_names_and_checkpoints():
    model = Dreamer(size="tiny", compile=True)
    names = list(model.state_dict())
    model.setup("fit")  # compiles in place; compilation itself happens at the first call
    assert list(model.state_dict()) == names
    assert model.hparams.compile is True
    plain = Dreamer(size="tiny")
    plain.load_state_dict(model.state_dict())


@pytest.mark.slow
def test_compiled_update_matches_eager():
    torch.manual_seed(0)
    eager = Dreamer(size="tiny")
    compiled = Dreamer(size="tiny")
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_networks()
    batch = fake_batch(4, 16, torch.device("cpu"))
    a, _ = losses(eager, batch, autocast=False)
    b, _ = losses(compiled, batch, autocast=False)
    assert float(b) == pytest.approx(float(a), rel=1e-4)
