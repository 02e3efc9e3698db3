"""Mixed precision (bf16 autocast, as Lightning's bf16-mixed) and the torch.compile option."""

import pytest
import pytorch_lightning as pl
import torch

from benchmarks.agent_speed import fake_batch
from dreamer.agent import Dreamer
from dreamer.config import precision_problem
from dreamer.update import compile_update


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
    compile_update(compiled)
    batch = fake_batch(4, 16, torch.device("cpu"))
    a, _ = losses(eager, batch, autocast=False)
    b, _ = losses(compiled, batch, autocast=False)
    assert float(b) == pytest.approx(float(a), rel=1e-4)


def test_bf16_keeps_continue_probabilities_and_two_hot_targets_in_float32():
    torch.manual_seed(0)
    wm = Dreamer(size="tiny").world_model
    feat = torch.randn(64, wm.rssm.feat_dim) * 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cont = wm.continue_prob(feat)
        logits = wm.continue_head(feat).squeeze(-1)
        target = wm.twohot.encode(torch.linspace(-50, 50, 64).to(torch.bfloat16))
    assert logits.dtype == torch.bfloat16, "the head itself runs in bf16"
    assert cont.dtype == torch.float32 and target.dtype == torch.float32
    # bf16 has 2^-8 steps below 1, as coarse as 1 - gamma: the sigmoid is taken in float32
    assert torch.equal(cont, torch.sigmoid(logits.float()))
    values = torch.linspace(-50, 50, 64).to(torch.bfloat16).float()
    assert torch.allclose(target.sum(-1), torch.ones(64))
    assert torch.allclose(encoded_value(wm.twohot, target), values, rtol=1e-4, atol=1e-4)


def encoded_value(twohot, weights):
    """The value a two-hot target encodes: its weights times the bin positions."""
    return (weights * twohot.bins).sum(-1)


@pytest.mark.parametrize("precision", ["32-true", "32", 32, "bf16-mixed", "bf16", None])
def test_supported_precisions(precision):
    assert precision_problem(precision) is None


@pytest.mark.parametrize("precision", ["16-mixed", 16, "bf16-true", "16-true", "64-true", "transformer-engine"])
def test_other_precisions_are_refused_with_what_is_allowed(precision):
    problem = precision_problem(precision)
    assert problem and "allowed: 32-true, bf16-mixed" in problem and repr(precision) in problem


def test_fit_setup_refuses_an_unsupported_trainer_precision():
    model = Dreamer(size="tiny")
    model.trainer = pl.Trainer(precision="bf16-true", accelerator="cpu", logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match="not supported"):
        model.setup("fit")


def test_checkpoint_restores_the_random_stream_and_reads_older_checkpoints():
    model = Dreamer(size="tiny")
    ckpt = {"hyper_parameters": dict(model.hparams)}
    torch.manual_seed(3)
    model.on_save_checkpoint(ckpt)
    expected = torch.rand(5)
    torch.manual_seed(4)
    model.on_load_checkpoint(ckpt)
    assert torch.equal(torch.rand(5), expected)
    old = {"hyper_parameters": dict(model.hparams),  # written before the GPU stream was saved
           "dreamer": {"updates": 7, "torch_rng_per_rank": [ckpt["dreamer"]["rng_per_rank"][0]["cpu"]]}}
    torch.manual_seed(4)
    model.on_load_checkpoint(old)
    assert torch.equal(torch.rand(5), expected) and model.updates == 7


def test_resume_refuses_a_checkpoint_of_an_older_architecture_in_one_line():
    model = Dreamer(size="tiny")
    ckpt = {"hyper_parameters": dict(model.hparams), "state_dict": model.state_dict()}
    model.on_load_checkpoint(ckpt)  # the same architecture loads
    old = dict(ckpt["state_dict"])
    old["world_model.rssm.gru.weight"] = old.pop("world_model.rssm.dynamics.gates.weight")
    with pytest.raises(ValueError, match="another architecture .*rssm.dynamics.gates.weight"):
        model.on_load_checkpoint({**ckpt, "state_dict": old})


def test_compiled_model_acts_eagerly():
    """Acting's batch sizes and no-grad mode would recompile the training graphs past the limit."""
    from torch._dynamo.utils import counters

    model = Dreamer(size="tiny", compile=True)
    model.setup("fit")
    counters.clear()
    obs = torch.randint(0, 256, (3, 64, 64, 3), dtype=torch.uint8)
    action, state = model.act(obs, torch.ones(3, dtype=torch.bool))
    model.act(obs, torch.zeros(3, dtype=torch.bool), state)
    assert action.shape == (3,) and not counters["frames"], dict(counters["frames"])


# ---------------------------------------------------------------- the CUDA-graphed update
def test_cuda_graph_is_refused_off_a_single_gpu_in_one_line():
    from dreamer.config import cuda_graph_problem

    assert cuda_graph_problem("cuda", 1, False) is None
    assert "runs on one GPU; this run has 2 processes" in cuda_graph_problem("cuda", 2, False)
    assert "alternatives" in cuda_graph_problem("cuda", 1, True)
    trainer = pl.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False)
    with pytest.raises(ValueError, match=r"^model.cuda_graph replays updates on a CUDA GPU; this run is on cpu: "):
        trainer.fit(Dreamer(size="tiny", cuda_graph=True), train_dataloaders=[fake_batch(2, 4, torch.device("cpu"))])


def test_training_with_cuda_graph_hands_the_raw_capturable_optimisers_over_and_lightning_counts_steps(monkeypatch):
    """What Lightning sees of the graphed update, on a CPU: the graph itself (dreamer.update.
    GraphedUpdate, checked against eager updates by benchmarks/gpu_agreement.py on GPUs) is
    replaced by eager updates. The optimisers it gets are torch's Adams switched to capturable,
    and every update counts three optimiser steps in trainer.global_step (checkpoints and logging
    go by it), as eager training does."""
    import dreamer.agent
    from dreamer.update import set_capturable, update

    calls = []

    class EagerStandIn:
        def __init__(self, model, optimizers):
            assert all(type(opt) is torch.optim.Adam for opt in optimizers)
            assert all(g["capturable"] for opt in optimizers for g in opt.param_groups)
            set_capturable(optimizers, False)  # Adam's capturable steps need a GPU
            self.model, self.optimizers = model, optimizers

        def __call__(self, batch):
            calls.append(batch["obs"].shape)
            return update(self.model, self.optimizers, batch)

    monkeypatch.setattr(dreamer.agent, "GraphedUpdate", EagerStandIn)
    monkeypatch.setattr(dreamer.agent, "cuda_graph_problem", lambda *args: None)
    torch.manual_seed(0)
    model = Dreamer(size="tiny", cuda_graph=True)
    before = {k: v.clone() for k, v in model.world_model.named_parameters()}
    trainer = pl.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([fake_batch(2, 4, torch.device("cpu"))] * 2,
                                                                  batch_size=None))
    assert len(calls) == 2 and model.updates == 2
    assert trainer.global_step == 6  # world model, actor and critic steps of two updates
    assert any(not torch.equal(v, before[k]) for k, v in model.world_model.named_parameters())


def test_adam_state_of_a_graphed_run_resumes_eagerly_on_a_cpu():
    """A checkpoint written with capturable Adams (their step counts on the GPU) resumes on a
    CPU once ``set_capturable(..., False)`` has run (``Dreamer.on_train_start``), and steps exactly
    as an Adam that was never capturable."""
    from dreamer.update import set_capturable

    def adam_after_one_step():
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(5))
        opt = torch.optim.Adam([p], lr=0.1)
        p.grad = torch.ones(5)
        opt.step()
        return p, opt

    p, opt = adam_after_one_step()
    saved = opt.state_dict()
    saved["param_groups"][0]["capturable"] = True  # as a graphed run saves it
    ref_p, ref_opt = adam_after_one_step()
    for resumed, mode in ((False, "as saved"), (True, "switched back")):
        q = torch.nn.Parameter(p.detach().clone())
        opt2 = torch.optim.Adam([q], lr=0.1)
        opt2.load_state_dict(saved)
        q.grad = torch.full((5,), 0.5)
        if not resumed:
            with pytest.raises(Exception, match="capturable"):
                opt2.step()
            continue
        set_capturable([opt2], False)
        opt2.step()
    ref_p.grad = torch.full((5,), 0.5)
    ref_opt.step()
    assert torch.equal(q, ref_p), mode
    assert opt2.state[q]["step"].device.type == "cpu" and float(opt2.state[q]["step"]) == 2.0
