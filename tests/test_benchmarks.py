"""The world-model quality benchmark on a tiny budget: it collects, trains, evaluates, writes its
dataset to a file and trains from that file to the same figures, and refuses bad arguments."""

import argparse
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from benchmarks import world_model_quality as wmq

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--games", "chaser", "--size", "tiny", "--updates", "4", "--evals", "2", "--batch", "4",
        "--seq-len", "16", "--context", "8", "--train-steps", "1200", "--eval-steps", "800",
        "--lanes", "4", "--eval-lanes", "4", "--threads", "1"]


def test_benchmark_trains_evaluates_and_reproduces_from_its_dataset_file(tmp_path, capsys):
    threads = torch.get_num_threads()
    data = tmp_path / "{game}.npz"
    try:
        collected = wmq.main([*TINY, "--save-data", str(data)])
        out = capsys.readouterr().out
        replayed = wmq.main([*TINY, "--data", str(data)])
    finally:
        torch.set_num_threads(threads)
    assert (tmp_path / "chaser.npz").is_file()
    assert [r["updates"] for r in collected] == [2, 4]
    assert "skill_h5" in out and "rAUC" in out and "copy-last-frame MSE" in out
    last = collected[-1]
    for key in ("recon_mse", "skill_h1", "skill_h5", "skill_h15", "skill_changed_h5", "kl", "kl_above_free"):
        assert math.isfinite(last[key]), key
    assert 0 <= last["recon_mse"] < 1 and 0 <= last["kl_above_free"] <= 1
    assert last["windows"] > 0 and last["rewarded_steps"] > 0  # chaser rewards every few steps
    # the file holds exactly what was collected: training from it gives the same figures
    for a, b in zip(collected, replayed):
        for key in ("recon_mse", "skill_h5", "reward_auc", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, nan_ok=True), key


def test_persistent_random_policy_repeats_its_action_as_often_as_asked():
    policy = wmq.PersistentRandomPolicy(seed=0, persist=0.75)
    actions = np.stack([policy.actions(64) for _ in range(400)])  # (steps, envs)
    repeats = (actions[1:] == actions[:-1]).mean()
    assert repeats == pytest.approx(0.75 + 0.25 / 15, abs=0.02)  # a fresh draw repeats 1 in 15
    assert set(np.unique(actions)) == set(range(15))


@pytest.mark.parametrize("args, message", [
    (["--games", "pong"], "unknown game"),
    (["--size", "huge"], "unknown size"),
    (["--persist", "1.0"], "--persist"),
    (["--model", "free_bits"], "key=value"),
    (["--model", "world_model.downsample=teleport"], "allowed"),
])
def test_benchmark_refuses_bad_arguments_with_one_line(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        wmq.main(args)
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


@pytest.mark.parametrize("content", [None, b"not a numpy file", "wrong game"])
def test_benchmark_refuses_a_missing_or_foreign_dataset_file(tmp_path, content, capsys):
    path = tmp_path / "coinrun.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "wrong game":
        np.savez(path, meta=np.array('{"version": %d, "game": "bigfish"}' % wmq.FORMAT_VERSION))
    with pytest.raises(SystemExit) as exit_info:
        wmq.main(["--games", "coinrun", "--data", str(path)])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "dataset" in err and str(path) in err and "Traceback" not in err


def test_benchmark_evaluates_a_training_checkpoint_and_refuses_another_games(tmp_path, capsys):
    from dreamer.agent import Dreamer
    from dreamer.quality import posterior_quality

    threads = torch.get_num_threads()
    data = tmp_path / "{game}.npz"
    torch.manual_seed(0)
    agent = Dreamer(size="tiny")
    ckpt = tmp_path / "last.ckpt"
    torch.save({"hyper_parameters": dict(agent.hparams), "state_dict": agent.state_dict(),
                "dreamer": {"game": "chaser", "updates": 7}}, ckpt)
    try:
        wmq.main([*TINY, "--updates", "0", "--save-data", str(data)])
        result, = wmq.main([*TINY, "--data", str(data), "--checkpoint", str(ckpt)])
        with pytest.raises(SystemExit):
            wmq.main([*TINY, "--games", "coinrun", "--data", str(data), "--checkpoint", str(ckpt)])
        lanes = wmq.eval_lanes(wmq.dataset(argparse.Namespace(data=str(data)), "chaser")["eval"])
        torch.manual_seed(0)  # the benchmark evaluates with --seed's latent samples, on 1 thread
        expected = posterior_quality(agent.world_model.eval(), lanes)["recon_mse"]
    finally:
        torch.set_num_threads(threads)
    assert "trained on chaser: give --games chaser" in capsys.readouterr().err
    assert result["updates"] == 7
    assert result["recon_mse"] == pytest.approx(expected, rel=1e-6)


def test_the_sheeprl_comparison_says_how_to_set_sheeprl_up_when_it_is_missing(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "vs_sheeprl.py"
    out = subprocess.run([sys.executable, str(script), "--venv", str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.startswith("error: no SheepRL venv") and "setup.sh" in out.stderr
    out = subprocess.run([sys.executable, str(script), "--rounds", "0"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--rounds must be a positive integer" in out.stderr


def test_the_speed_benchmark_refuses_an_override_the_model_refuses_in_one_line():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "agent_speed.py"
    out = subprocess.run([sys.executable, str(script), "--no-act", "--sizes", "tiny", "--overrides", "cnn_mults=1,2"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.splitlines()[-1] == ("agent_speed.py: error: model.overrides.cnn_mults must be a list of 1 to 6 "
                                           "positive integers (channels per 64x64 -> 4x4 conv stage, in units of "
                                           "depth), got '1,2'")


def test_sheeprl_configuration_maps_onto_our_size_overrides():
    from benchmarks.vs_sheeprl import xs_overrides
    from dreamer.agent import Dreamer

    config = {"algo": {"dense_units": 256, "mlp_layers": 1, "world_model": {
        "recurrent_model": {"recurrent_state_size": 256, "dense_units": 256}, "stochastic_size": 32,
        "discrete_size": 32, "encoder": {"cnn_channels_multiplier": 24}}}}
    model = Dreamer(size="tiny", overrides=xs_overrides(config))
    encoder = sum(p.numel() for p in model.world_model.encoder.parameters())
    assert round(encoder / 1e6, 2) == 0.39  # SheepRL's XS encoder, by its own count


NO_ENV_LIBS = "import sys; sys.modules.update(dict.fromkeys(['procgen', 'gymnasium', 'mlflow', 'omegaconf']))"


def run_without_env_libs(script: str, *args: str) -> subprocess.CompletedProcess:
    """``script`` run as on the GPU machines: procgen, gymnasium, mlflow and omegaconf cannot be imported."""
    code = f"{NO_ENV_LIBS}; import runpy; sys.argv = {[script, *args]!r}; runpy.run_path({script!r}, run_name='__main__')"
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_the_gpu_check_runs_without_procgen_on_its_shipped_dataset():
    """What benchmarks/gpu_check.sh runs on a GPU machine (no procgen, gymnasium, mlflow or
    omegaconf there), at the smallest size on this CPU: the update benchmark and the world-model
    quality benchmark in bf16 on the bigfish dataset shipped with the check."""
    assert subprocess.run(["bash", "-n", "benchmarks/gpu_check.sh"], cwd=ROOT).returncode == 0
    speed = run_without_env_libs("benchmarks/agent_speed.py", "--sizes", "tiny", "--no-act", "--updates", "1",
                                 "--batch", "2", "--seq", "8", "--precision", "bf16")
    assert speed.returncode == 0, speed.stderr
    assert re.search(r"^\s+tiny\s+[\d.]+\s+[\d.]+", speed.stdout, re.M), speed.stdout
    quality = run_without_env_libs("benchmarks/world_model_quality.py", "--games", "bigfish", "--data",
                                   "benchmarks/datasets/{game}.npz", "--size", "tiny", "--updates", "1",
                                   "--evals", "1", "--batch", "4", "--seq-len", "16", "--precision", "bf16")
    assert quality.returncode == 0, quality.stderr
    assert "precision bf16" in quality.stdout and "copy-last-frame MSE" in quality.stdout
    assert re.search(r"8016 unseen-level steps, \d+ rewarded", quality.stdout), quality.stdout
    agreement = run_without_env_libs("benchmarks/gpu_agreement.py", "--device", "cpu", "--size", "tiny")
    assert agreement.returncode == 0, agreement.stdout + agreement.stderr
    assert "largest relative difference 0.00e+00: OK" in agreement.stdout
    assert re.search(r"bf16-mixed loss [\d.]+: finite", agreement.stdout), agreement.stdout
    fit = run_without_env_libs("benchmarks/gpu_fit_check.py", "--device", "cpu", "--size", "tiny", "--batch", "2",
                               "--seq", "8", "--updates", "2", "--precisions", "32-true")
    assert fit.returncode == 0, fit.stdout + fit.stderr
    assert re.search(r"32-true +eager resumed +18 +6 +True", fit.stdout) and fit.stdout.rstrip().endswith("OK"), fit.stdout
    blocked = subprocess.run([sys.executable, "-c", f"{NO_ENV_LIBS}; import procgen"], capture_output=True)
    assert blocked.returncode != 0  # the blocker works, so the runs above did not use procgen


def test_the_gpu_agreement_check_draws_the_same_noise_everywhere_and_flags_differences():
    """The part of the GPU check that compares devices: noise comes from the seeded CPU stream
    whatever device asks for it, and a loss off by more than the tolerance is reported."""
    from benchmarks.gpu_agreement import TOLERANCE, cpu_noise, relative_differences

    draw = cpu_noise(torch.rand)
    torch.manual_seed(3)
    expected = torch.rand(4, 2)
    torch.manual_seed(3)
    assert torch.equal(draw(4, 2, device=torch.device("cpu")), expected)
    differences = relative_differences({"loss/image": 1000.0, "loss/actor": 1e-4},
                                       {"loss/image": 1000.5, "loss/actor": 3e-4})
    assert differences["loss/image"] == pytest.approx(5e-4)  # within tolerance
    assert differences["loss/actor"] == pytest.approx(2e-3)  # absolute near zero: 2e-4 / 0.1
    assert differences["loss/image"] < TOLERANCE < differences["loss/actor"]


def test_the_speed_benchmark_times_acting_toward_goals_in_dreams_and_refuses_bad_plans():
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).resolve().parents[1] / "benchmarks" / "agent_speed.py")
    out = subprocess.run([sys.executable, script, "--sizes", "tiny", "--updates", "1", "--batch", "2", "--seq", "8",
                          "--act-plans", "0", "4"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if "acting toward goals" in line]
    assert [line.split("matcher ")[1].split(":")[0] for line in lines] == ["sampling", "choosing in 4 dreams"]
    assert all(float(line.split(": ")[1].split()[0]) > 0 for line in lines)
    for bad, message in ((["--act-plans", "-1"], "--act-plans must be >= 0, got [-1]"),
                         (["--act-plans", "4", "--no-act"], "--act-plans measures acting: leave out --no-act")):
        out = subprocess.run([sys.executable, script, "--sizes", "tiny", *bad], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and out.stderr.splitlines()[-1] == f"agent_speed.py: error: {message}"


def test_the_roofline_floor_charges_each_operator_its_flops_or_its_bytes_whichever_takes_longer():
    from benchmarks.agent_speed import roofline

    a, b = torch.randn(64, 32), torch.randn(32, 16)
    # a (64x32) @ b (32x16): 2*64*32*16 = 65,536 FLOPs; (2048 + 512 + 1024) floats = 14,336 bytes
    mm = roofline(lambda: a @ b, gflops=1.0, gbps=1.0)
    assert mm["ops"] == 1 and mm["gb"] == pytest.approx(14_336e-9) and mm["gflop"] == pytest.approx(65_536e-9)
    assert mm["seconds"] == pytest.approx(65_536e-9)  # compute-bound at 1 GFLOP/s and 1 GB/s
    assert roofline(lambda: a @ b, gflops=1.0, gbps=0.1)["seconds"] == pytest.approx(143_360e-9)  # now bytes
    # a transpose is a view (nothing moved); an addition moves its two inputs and its output
    add = roofline(lambda: a.t() + a.t(), gflops=1.0, gbps=1.0)
    assert add["ops"] == 1 and add["seconds"] == pytest.approx(3 * 2048 * 4e-9)
    # backward operators count too: mm's gradient for a (one more matmul of the same size)
    w = b.clone().requires_grad_()
    both = roofline(lambda: (a @ w).sum().backward(), gflops=1.0, gbps=1e9)
    assert both["seconds"] == pytest.approx(2 * 65_536e-9, rel=0.05)


def test_the_dream_against_game_probe_branches_every_first_action_from_restored_states():
    """On sanity-colour the game's truth is known: from every state exactly one first action pays
    1 more than the others (SD across the 15 returns sqrt(14) / 15), so a model that predicts no
    reward has spread ratio 0; the probe's frames lead the model to the states it branches from."""
    from dreamer.agent import Dreamer

    probe = wmq.real_probe("sanity-colour", "easy", 200, seed=0)
    game = probe["game_returns"]  # (64, 15)
    assert game.shape == (wmq.PROBE_STATES, 15) and probe["frames"].shape[:2] == (wmq.PROBE_STATES, wmq.PROBE_STEPS)
    np.testing.assert_allclose(np.sort(game, 1)[:, -1] - np.sort(game, 1)[:, -2], 1.0)
    np.testing.assert_allclose(game.std(1), np.sqrt(14) / 15)
    torch.manual_seed(0)
    wm = Dreamer(size="tiny").world_model.eval()  # its reward head starts at exactly 0
    result = wmq.dreams_against_game(wm, probe)
    assert result["spread_ratio"] == 0.0 and result["action_corr"] == 0.0
    assert result["spread_game"] == pytest.approx(np.sqrt(14) / 15)
