"""LaProp (dreamer/optim.py), the newest reference's optimiser, against updates computed by hand,
and its place in the agent: chosen by model.optimizer.kind, recorded in checkpoints, refused where
a checkpoint's optimiser state would not fit."""

import io
import math

import numpy as np
import pytest
import torch

from dreamer.agent import Dreamer
from dreamer.checkpoints import checkpoint_mismatch
from dreamer.config import argument_problem, cuda_graph_problem
from dreamer.optim import LaProp


def laprop_by_hand(p, grads, lr, eps, agc, pmin, warmup, b1=0.9, b2=0.999):
    """The reference's chain (clip_by_agc, scale_by_rms, scale_by_momentum, linear warm-up from
    0) written out in NumPy for one tensor."""
    p, m, v = np.array(p, np.float64), 0.0, 0.0
    for t, g in enumerate(grads, 1):
        g = np.array(g, np.float64)
        if agc:
            upper = agc * max(pmin, np.linalg.norm(p))
            g = g / max(1.0, np.linalg.norm(g) / upper)
        v = b2 * v + (1 - b2) * g * g
        u = g / (np.sqrt(v / (1 - b2**t)) + eps)
        m = b1 * m + (1 - b1) * u
        ramp = min(1.0, (t - 1) / warmup) if warmup else 1.0
        p = p - lr * ramp * m / (1 - b1**t)
    return p


@pytest.mark.parametrize("agc, warmup", [(0.0, 0), (0.3, 0), (0.3, 2), (0.0, 3)])
def test_laprop_steps_match_the_references_chain_by_hand(agc, warmup):
    start = [0.5, -1.0, 2.0]
    grads = [[3.0, 0.1, -0.2], [-0.5, 0.4, 0.0], [1.0, 1.0, 1.0], [0.2, -3.0, 0.5]]
    p = torch.nn.Parameter(torch.tensor(start, dtype=torch.float64))
    opt = LaProp([p], lr=0.1, eps=1e-20, agc=agc, warmup=warmup)
    for g in grads:
        p.grad = torch.tensor(g, dtype=torch.float64)
        opt.step()
    np.testing.assert_allclose(p.detach().numpy(), laprop_by_hand(start, grads, 0.1, 1e-20, agc, 1e-3, warmup), rtol=1e-12)


def test_the_first_laprop_step_moves_each_weight_by_lr_without_warmup_or_clipping():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    opt = LaProp([p], lr=0.01, eps=1e-20, agc=0.0, warmup=0)
    p.grad = torch.tensor([1e-6, -50.0, 3.0])
    opt.step()  # normalised by its own RMS, then momentum's bias correction: a step of lr per weight
    np.testing.assert_allclose(p.detach().numpy(), [0.99, -1.99, 2.99], rtol=1e-6)


def test_agc_limits_a_tensors_gradient_to_a_share_of_its_norm():
    p = torch.nn.Parameter(torch.tensor([3.0, 4.0]))  # norm 5: the gradient may have norm 1.5
    opt = LaProp([p], lr=1.0, agc=0.3, warmup=0)
    p.grad = torch.tensor([30.0, 40.0])
    opt.step()
    assert torch.allclose(opt.state[p]["exp_avg_sq"], 0.001 * torch.tensor([0.9, 1.2]) ** 2)


def test_laprop_state_round_trips_and_steps_on():
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    opt_a, opt_b = LaProp(a.parameters(), lr=1e-2, warmup=4), LaProp(b.parameters(), lr=1e-2, warmup=4)
    x = torch.randn(8, 4)
    for step in range(6):
        for net, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            net(x).pow(2).sum().backward()
            opt.step()
        if step == 2:  # as a checkpoint does: through a file
            buffer = io.BytesIO()
            torch.save(opt_a.state_dict(), buffer)
            buffer.seek(0)
            opt_b = LaProp(b.parameters(), lr=1e-2, warmup=4)
            opt_b.load_state_dict(torch.load(buffer, weights_only=True))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb)


def test_the_agent_trains_with_laprop_when_asked_and_records_it():
    torch.manual_seed(0)
    agent = Dreamer(size="tiny", optimizer={"kind": "laprop", "warmup": 10})
    wm, actor, critic = agent.configure_optimizers()
    assert all(isinstance(o, LaProp) for o in (wm, actor, critic))
    assert wm.defaults["agc"] == 0.3 and wm.defaults["warmup"] == 10 and wm.defaults["lr"] == 1e-4
    assert agent.hparams.optimizer == {"kind": "laprop", "agc": 0.3, "warmup": 10}
    assert isinstance(Dreamer(size="tiny").configure_optimizers()[0], torch.optim.Adam)
    assert "allowed: adam, laprop" in argument_problem({**dict(Dreamer(size="tiny").hparams), "optimizer": {"kind": "sgd"}})
    assert "laprop has not been run in a CUDA graph" in cuda_graph_problem("cuda", 1, False, "laprop")


def test_a_resume_with_another_optimiser_is_refused_and_old_checkpoints_count_as_adam():
    old = {"hyper_parameters": {"size": "tiny", "overrides": None}}  # written before the knob
    assert checkpoint_mismatch(old, "tiny", None, None, "adam") == []
    assert "model.optimizer.kind: checkpoint 'adam', this run 'laprop'" in checkpoint_mismatch(old, "tiny", None, None, "laprop")[0]
    assert checkpoint_mismatch(old, "tiny", None, None, None) == []  # validation restores no optimiser


def test_laprop_with_warmup_takes_no_step_at_first_and_full_steps_after():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = LaProp([p], lr=1.0, agc=0.0, warmup=4)
    moves = []
    for _ in range(6):
        before = p.detach().clone()
        p.grad = torch.ones(2)
        opt.step()
        moves.append(float((p.detach() - before).abs()[0]))
    # lr ramps 0, 1/4, 2/4, 3/4, 1, 1; a constant gradient keeps the normalised momentum at 1
    np.testing.assert_allclose(moves, [0.0, 0.25, 0.5, 0.75, 1.0, 1.0], rtol=1e-5)
    assert math.isclose(float(opt.state[p]["step"]), 6.0)
