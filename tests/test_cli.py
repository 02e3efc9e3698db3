"""The CLI end to end, in subprocesses: fit, MLflow records, SIGKILL and resume, refusals, validate."""

import signal
import subprocess
import sys
import time

import mlflow
import pytest

from clirun import ROOT, SMOKE, cli, load, quick_checkpoints, start_cli


def test_fit_smoke_writes_checkpoint_mlflow_run_and_config(smoke_run):
    cwd, out = smoke_run
    run_dir = cwd / "runs" / "coinrun-tiny-seed0"
    ckpt = load(run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["ReplayDataModule"]["env_steps"] == 768
    assert ckpt["dreamer"]["updates"] > 100
    assert (run_dir / "config.yaml").exists()
    assert "MLflow: tracking URI sqlite:///mlflow.db" in out.stdout
    assert "unseen_levels" in out.stdout  # the validation table

    client = mlflow.MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("procgen-dreamer").experiment_id)
    assert run.info.run_name == "coinrun-tiny-seed0"
    assert run.data.tags["game"] == "coinrun" and run.data.tags["size"] == "tiny"
    assert run.data.params["model.size"] == "tiny" and run.data.params["data.batch_size"] == "4"
    for key in ("loss/world_model", "loss/image", "loss/reward", "loss/continue", "loss/kl_dyn",
                "loss/kl_rep", "loss/actor", "loss/critic", "actor/entropy", "actor/return_scale",
                "val/unseen_levels/return", "val/train_levels/normalized_score"):
        assert key in run.data.metrics, key
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/world_model")]
    assert max(steps) <= 768 and max(steps) > 256, "metrics must be logged against env steps"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    assert "config.yaml" in artifacts
    logged = [a.path for d in artifacts for a in client.list_artifacts(run.info.run_id, d)]
    assert any(p.endswith(".ckpt") for p in logged), logged

    # DreamVisualizer: pictures every 100 updates and at the end, in the run dir and in MLflow
    final = run_dir / "dreams" / "dream_vs_reality_768.png"
    assert f"dream picture: {final.relative_to(cwd)}" in out.stdout
    dreams = {a.path for a in client.list_artifacts(run.info.run_id, "dreams")}
    for name in ("dream_vs_reality", "actor_dream", "dream_error", "value_trace"):
        assert f"dreams/{name}_768.png" in dreams, (name, dreams)
    assert "dreams/dream_768.gif" in dreams
    assert len(dreams) >= 3 * 5, "pictures also during training, not only at the end"
    for k in (1, 8, 15):
        history = client.get_metric_history(run.info.run_id, f"dream/error_h{k}")
        assert history and history[-1].step == 768 and 0.0 <= history[-1].value <= 1.0
        assert f"dream/baseline_psnr_h{k}" in run.data.metrics


def test_validate_from_checkpoint_alone(smoke_run, tmp_path):
    cwd, _ = smoke_run
    ckpt = cwd / "runs" / "coinrun-tiny-seed0" / "checkpoints" / "last.ckpt"
    out = cli(tmp_path, "validate", "--config", SMOKE, "--ckpt_path", str(ckpt))
    assert "train_levels" in out.stdout and "unseen_levels" in out.stdout
    assert "val/unseen_levels/normalized_score" in out.stdout
    (line,) = [x for x in out.stdout.splitlines() if x.startswith("dream picture: ")]
    assert (tmp_path / line.removeprefix("dream picture: ")).is_file()


def test_mismatched_checkpoint_is_refused_with_what_differs(smoke_run, tmp_path):
    cwd, _ = smoke_run
    ckpt = str(cwd / "runs" / "coinrun-tiny-seed0" / "checkpoints" / "last.ckpt")
    out = cli(tmp_path, "fit", "--config", SMOKE, "--model.size", "small", "--ckpt_path", ckpt,
              check=False)
    assert out.returncode != 0 and "size: checkpoint 'tiny', this run 'small'" in out.stderr
    out = cli(tmp_path, "fit", "--config", SMOKE, "--data.game", "bigfish", "--ckpt_path", ckpt,
              check=False)
    assert out.returncode != 0 and "game: checkpoint 'coinrun', this run 'bigfish'" in out.stderr
    bad = tmp_path / "corrupt.ckpt"
    bad.write_bytes(b"not a checkpoint")
    out = cli(tmp_path, "validate", "--config", SMOKE, "--ckpt_path", str(bad), check=False)
    assert out.returncode != 0 and f"cannot read checkpoint {bad}" in out.stderr
    assert "Traceback" not in out.stderr


def test_unsupported_precision_is_refused_before_anything_starts(tmp_path):
    out = cli(tmp_path, "fit", "--config", SMOKE, "--trainer.precision", "16-mixed", check=False)
    assert out.returncode == 2 and "allowed: auto, 32-true, bf16-mixed" in out.stderr
    assert "Traceback" not in out.stderr and not (tmp_path / "runs").exists()


def test_print_config_shows_the_run_name_and_paths_and_reads_back(tmp_path):
    out = cli(tmp_path, "fit", "--config", SMOKE, "--print_config")
    import yaml

    printed = yaml.safe_load(out.stdout)
    run = "runs/coinrun-tiny-seed0"
    assert printed["trainer"]["default_root_dir"] == run
    assert printed["data"]["replay_dir"] == f"{run}/replay"
    assert printed["trainer"]["logger"]["init_args"]["run_name"] == "coinrun-tiny-seed0"
    assert printed["checkpoint"]["dirpath"] == f"{run}/checkpoints"
    assert not any(tmp_path.iterdir()), "printing the config starts nothing"
    (tmp_path / "printed.yaml").write_text(out.stdout)
    again = cli(tmp_path, "fit", "--config", "printed.yaml", "--print_config=skip_null")
    assert yaml.safe_load(again.stdout)["data"] == {k: v for k, v in printed["data"].items() if v is not None}
    assert ": null" not in again.stdout
    validate = yaml.safe_load(cli(tmp_path, "validate", "--config", SMOKE, "--print_config").stdout)
    assert validate["trainer"]["default_root_dir"] == "runs/coinrun-tiny-seed0-validate"


def printed_model(out) -> dict:
    import yaml

    return yaml.safe_load(out.stdout)["model"]


def test_dreams_config_adds_its_callbacks_to_those_of_the_config_below(tmp_path):
    import yaml

    out = cli(tmp_path, "fit", "--config", SMOKE, "--config", str(ROOT / "configs" / "dreams.yaml"),
              "--print_config")
    callbacks = {c["class_path"].rsplit(".", 1)[1]: c["init_args"]
                 for c in yaml.safe_load(out.stdout)["trainer"]["callbacks"]}
    assert list(callbacks) == ["GoalEvaluation", "DreamGeneration", "BridgeDistillation", "DreamWeaning"]
    assert printed_model(out)["class_path"] == "dreamer.goals.GoalDreamer"
    printed = yaml.safe_load(out.stdout)
    assert printed["checkpoint"]["every_env_steps"] == 256  # the smoke config's cadence, kept
    assert printed["dream_pictures"]["every_n_updates"] == 100 and printed["dream_pictures"]["enabled"]


def test_dreams_search_config_is_dreams_yaml_with_the_matcher_learning_from_its_search(tmp_path):
    import yaml

    def callbacks(name):
        out = cli(tmp_path, "fit", "--config", SMOKE, "--config", str(ROOT / name), "--print_config")
        return {c["class_path"].rsplit(".", 1)[1]: c["init_args"] for c in yaml.safe_load(out.stdout)["trainer"]["callbacks"]}

    dreams, search = callbacks("configs/dreams.yaml"), callbacks("experiments/configs/dreams_search.yaml")
    assert list(search) == list(dreams) == ["GoalEvaluation", "DreamGeneration", "BridgeDistillation", "DreamWeaning"]
    assert dreams["DreamGeneration"]["plan_distill"] == 0 and dreams["DreamGeneration"]["rl_real_fraction"] == 0
    changed = {k: v for k, v in search["DreamGeneration"].items() if dreams["DreamGeneration"][k] != v}
    assert changed == {"plan_distill": 16, "rl_real_fraction": 0.5}
    assert all(search[name] == dreams[name] for name in ("GoalEvaluation", "BridgeDistillation", "DreamWeaning"))


def test_sigterm_ends_the_mlflow_run_killed_and_the_resume_continues_it(tmp_path):
    quick = quick_checkpoints(tmp_path / "quick.yaml")
    args = ["fit", "--config", SMOKE, "--config", quick, "--model.max_env_steps", "100000"]
    proc = start_cli(tmp_path, *args, stderr=subprocess.PIPE, text=True)
    last = tmp_path / "runs" / "coinrun-tiny-seed0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    try:
        while time.time() < deadline and not last.exists():
            time.sleep(0.5)
        assert last.exists(), "no checkpoint within 240 s"
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err
    assert err.strip().splitlines()[-1] == \
        "stopped by SIGTERM; resume from the last checkpoint with --ckpt_path last"
    saved = load(last)  # the checkpoint survives whole
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("procgen-dreamer").experiment_id)
    assert run.info.status == "KILLED"

    target = saved["ReplayDataModule"]["env_steps"] + 64
    cli(tmp_path, "fit", "--config", SMOKE, "--config", quick, "--model.max_env_steps", str(target),
        "--ckpt_path", "last")
    (resumed,) = client.search_runs(run.info.experiment_id)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss/world_model")]
    assert max(steps) > saved["ReplayDataModule"]["env_steps"], "the env-step axis continues"


def test_sigkill_then_resume_continues_counters_and_memmap_replay(tmp_path):
    quick = quick_checkpoints(tmp_path / "quick.yaml")
    args = ["fit", "--config", SMOKE, "--config", quick, "--data.replay_storage", "memmap",
            "--model.max_env_steps", "100000"]
    proc = start_cli(tmp_path, *args)
    last = tmp_path / "runs" / "coinrun-tiny-seed0" / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            if last.exists() and load(last)["ReplayDataModule"]["env_steps"] >= 192:
                break
            time.sleep(1)
        else:
            pytest.fail("no checkpoint at 192 env steps within 240 s")
        time.sleep(2)  # let it run past the checkpoint before the kill
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = load(last)
    saved_steps = before["ReplayDataModule"]["env_steps"]
    saved_updates = before["dreamer"]["updates"]
    saved_count = before["ReplayDataModule"]["replay"]["count"].clone()

    target = saved_steps + 128
    cli(tmp_path, "fit", "--config", SMOKE, "--config", quick, "--data.replay_storage", "memmap",
        "--model.max_env_steps", str(target), "--ckpt_path", "last")
    after = load(last)
    assert after["ReplayDataModule"]["env_steps"] == target
    assert after["dreamer"]["updates"] > saved_updates
    count = after["ReplayDataModule"]["replay"]["count"]
    # every env wrote 64 more acting steps (plus one per finished episode) on top of the checkpoint
    assert ((count - saved_count) >= 128 // 4).all()
    assert after["ReplayDataModule"]["episodes"] >= before["ReplayDataModule"]["episodes"]


def test_fit_with_dreams_logs_dream_goal_and_weaning_metrics(tmp_path):
    # in the learned goal space (the default deter space runs the same code, minus its learning)
    out = cli(tmp_path, "fit", "--config", SMOKE, "--config", str(ROOT / "configs" / "dreams.yaml"),
              "--model.max_env_steps", "384", "--model.goals.rollouts", "2", "--model.goals.space", "inverse")
    assert "goal_step_success" in out.stdout  # the validation table has goal columns
    ckpt = load(tmp_path / "runs" / "coinrun-tiny-seed0" / "checkpoints" / "last.ckpt")
    (buffer,) = [v["buffer"] for k, v in ckpt["callbacks"].items() if k.startswith("DreamGeneration")]
    assert buffer["feat"].shape[0] > 0, "the dream buffer is saved for resume"
    assert len(ckpt["optimizer_states"]) == 4  # world model, actor, critic, goal matcher
    space_optimizer = ckpt["state_dict"]["goal_model.space._extra_state"]["optimizer"]
    assert space_optimizer["state"], "the goal space's Adam moments are saved for resume"

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("procgen-dreamer").experiment_id)
    for key in ("dream/quality", "dream/count", "goal_matcher/loss", "goal_matcher/dream_success",
                "goal_matcher/actor_dream_success", "bridge/kl", "bridge/transferred",
                "weaning/weight", "goal/step_success", "val/unseen_levels/goal/step_success",
                "goal_space/inverse_accuracy", "goal_space/inverse_loss",
                "val/train_levels/goal/episode_success"):
        assert key in run.data.metrics, key
    weights = [m.value for m in client.get_metric_history(run.info.run_id, "weaning/weight")]
    assert weights[0] > weights[-1] and all(0.0 <= w <= 1.0 for w in weights)

    # the learned space's state (its optimiser, a dict in the state dict) resumes; another space is refused
    args = ["fit", "--config", SMOKE, "--config", str(ROOT / "configs" / "dreams.yaml"), "--model.goals.rollouts", "2"]
    other = cli(tmp_path, *args, "--model.max_env_steps", "448", "--model.goals.space", "deter",
                "--ckpt_path", "last", check=False)
    assert other.returncode == 2 and other.stderr.strip().splitlines()[-1].startswith(
        "error: the checkpoint's goal space is 'inverse', this run's 'deter'; resume with --model.goals.space inverse")
    cli(tmp_path, *args, "--model.max_env_steps", "448", "--model.goals.space", "inverse", "--ckpt_path", "last")
    resumed = load(tmp_path / "runs" / "coinrun-tiny-seed0" / "checkpoints" / "last.ckpt")
    assert resumed["ReplayDataModule"]["env_steps"] >= 448


def test_world_model_probe_reads_a_checkpoint_and_its_replay(smoke_run, tmp_path):
    cwd, _ = smoke_run
    ckpt = cwd / "runs" / "coinrun-tiny-seed0" / "checkpoints" / "last.ckpt"
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "world_model_probe.py"), str(ckpt),
                          "--batches", "2"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "real reward" in out.stdout and "continue probability" in out.stdout
    rows = [line.split() for line in out.stdout.splitlines()[1:] if line and line[0] in " -0123456789"]
    assert sum(int(r[1]) for r in rows if len(r) == 3) == 2 * 16 * 32  # every sampled step counted
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    out = subprocess.run([sys.executable, str(ROOT / "experiments" / "world_model_probe.py"), str(bad)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and f"cannot read checkpoint {bad}" in out.stderr and "Traceback" not in out.stderr


def test_precision_auto_picks_bf16_only_where_it_was_measured_faster(tmp_path, monkeypatch):
    import torch

    from cli import auto_precision, cpu_bf16

    amx, avx512, avx2 = tmp_path / "amx", tmp_path / "avx512", tmp_path / "avx2"
    amx.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512_bf16 amx_bf16 amx_tile amx_int8\n")
    avx512.write_text("processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16\nbugs\t\t: amx_bf16\n")
    avx2.write_text("processor\t: 0\nflags\t\t: fpu sse avx2\n")
    assert [cpu_bf16(str(f)) for f in (amx, avx512, avx2, tmp_path / "none")] == ["amx_bf16", "avx512_bf16", None, None]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("cli.cpu_bf16", lambda: "amx_bf16")
    assert auto_precision("auto", "tiny")[0] == auto_precision("cpu", "200M")[0] == "bf16-mixed"
    assert auto_precision("mps", "12M")[0] == "32-true"
    assert auto_precision(type("CPUAccelerator", (), {})(), "small")[0] == "bf16-mixed"  # an Accelerator instance
    # AVX512-BF16 without AMX: bf16 was faster from the 12M preset up, slower below
    monkeypatch.setattr("cli.cpu_bf16", lambda: "avx512_bf16")
    assert [auto_precision("cpu", size)[0] for size in ("tiny", "1M", "small", "12M", "25M", "200M")] == \
        ["32-true"] * 3 + ["bf16-mixed"] * 3
    assert "from 12M up" in auto_precision("cpu", "small")[1]
    monkeypatch.setattr("cli.cpu_bf16", lambda: None)
    assert auto_precision("auto", "12M")[0] == auto_precision("auto", "tiny")[0] == "32-true"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "NVIDIA H100")
    monkeypatch.setattr("cli.cpu_bf16", lambda: "amx_bf16")
    assert auto_precision("auto", "200M")[0] == auto_precision("gpu", "12M")[0] == "32-true"  # measured faster on GPUs
    assert "slower than fp32" in auto_precision("gpu", "12M")[1]
    monkeypatch.setattr("cli.cpu_bf16", lambda: None)
    assert auto_precision("cpu", "12M")[0] == "32-true"  # a GPU machine told to train on its CPU


def test_precision_auto_from_the_command_line_or_a_config_file_and_the_last_setting_wins(tmp_path):
    import yaml

    from cli import auto_precision

    here = auto_precision("auto", "tiny")[0]  # the smoke config's size
    out = cli(tmp_path, "fit", "--config", SMOKE, "--trainer.precision", "auto", "--print_config")
    assert yaml.safe_load(out.stdout)["trainer"]["precision"] == here
    assert f"trainer.precision auto: {here} (" in out.stderr
    # the choice is the model size's (on an AVX512-BF16 CPU tiny gets 32-true, 12M bf16-mixed)
    out = cli(tmp_path, "fit", "--config", SMOKE, "--model.size", "12M", "--trainer.precision", "auto", "--print_config")
    assert yaml.safe_load(out.stdout)["trainer"]["precision"] == auto_precision("auto", "12M")[0]
    (tmp_path / "auto.yaml").write_text("trainer:\n  precision: auto\n")
    out = cli(tmp_path, "fit", "--config", SMOKE, "--config", "auto.yaml", "--print_config")
    assert yaml.safe_load(out.stdout)["trainer"]["precision"] == here
    out = cli(tmp_path, "fit", "--config", "auto.yaml", "--config", SMOKE, "--trainer.precision=bf16-mixed",
              "--print_config")
    assert yaml.safe_load(out.stdout)["trainer"]["precision"] == "bf16-mixed" and "auto" not in out.stderr
