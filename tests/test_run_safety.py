"""Nothing lost, nothing silent: refusals leave every file as it was, bad input is one line, a
diverging loss stops the run, a closed env raises, metrics log each fact once."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import mlflow
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from clirun import ROOT, SMOKE, cli, quick_checkpoints, start_cli

from datamodules.procgen import ProcgenVectorEnv
from dreamer.agent import Dreamer
from dreamer.checkpoints import restore_agent
from dreamer.config import ActorCriticKnobs, argument_problem
from dreamer.goals import GoalDreamer
from dreamer.migrations import grouped
from dreamer.run_dir import run_files

RUN = os.path.join("runs", "coinrun-tiny-seed0")


def _hashes(root):
    """sha1 of every file under ``root`` (relative path -> digest), run locks (``.<run>.lock``,
    beside the run directories) aside."""
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            if name.startswith(".") and name.endswith(".lock"):
                continue
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha1(f.read()).hexdigest()
    return out


# One Python process runs every case through cli.main (saves 10 s of imports per case), each in
# its own child process, so a case that crashed the interpreter would show as such.
DRIVER = r"""
import io, json, sys, traceback, multiprocessing as mp
sys.path.insert(0, sys.argv[1])

def one(args, queue):
    import contextlib, cli
    err, out = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            cli.main(args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc(file=err)
            code = -1
    queue.put((code, err.getvalue()))

if __name__ == "__main__":
    import cli  # noqa: F401 (imported once here, the forked cases inherit it)
    mp.set_start_method("fork")
    results = []
    for args in json.loads(sys.argv[2]):
        queue = mp.Queue()
        proc = mp.Process(target=one, args=(args, queue))
        proc.start()
        proc.join(300)
        results.append(queue.get() if proc.exitcode == 0 else (proc.exitcode, "crashed"))
    print(json.dumps(results))
"""


def test_bad_inputs_get_one_line_and_leave_the_run_as_it_was(smoke_run, tmp_path):
    src, _ = smoke_run
    shutil.copytree(src / "runs", tmp_path / "runs")
    shutil.copy(src / "mlflow.db", tmp_path / "mlflow.db")
    (tmp_path / "broken.yaml").write_text("model:\n  size: [tiny\n")
    (tmp_path / "flat.yaml").write_text("trainer: 5\n")
    (tmp_path / "noise.ckpt").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "a_file").write_text("")
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "bad.db").write_bytes(np.random.default_rng(1).bytes(4096))
    before = _hashes(tmp_path)
    fit = ["fit", "--config", SMOKE]
    cases = [
        (fit, "holds a run (checkpoints, config.yaml"),  # a second fit never wipes the first
        (["validate", "--config", SMOKE], "validate needs --ckpt_path"),
        (fit + ["--ckpt_path", "last", "--data.replay_storage", "memmap"],
         "resume with --data.replay_storage ram"),
        (fit + ["--ckpt_path", os.path.join(RUN, "checkpoints", "last.ckpt"), "--model.size", "small"],
         "size: checkpoint 'tiny', this run 'small'"),
        (fit + ["--ckpt_path", "last", "--trainer.default_root_dir", "runs/new"], "no checkpoint to resume"),
        (fit + ["--data.num_envs", "0"], "data.num_envs must be an integer >= 1, got 0"),
        (fit + ["--data.num_envs", "-1"], "data.num_envs must be an integer >= 1, got -1"),
        (fit + ["--data.val_episodes", "0"], "data.val_episodes must be an integer >= 1"),
        (fit + ["--data.test_num_envs", "0"], "data.test_num_envs must be an integer >= 1"),
        (fit + ["--model.max_env_steps", "0"], "model.max_env_steps must lie in [1, inf]"),
        (fit + ["--model.world_model.lr", "1000"], "model.world_model.lr must lie in (0, 1]"),
        (fit + ["--model.actor_critic.actor_lr", "1e10"], "model.actor_critic.actor_lr must lie in (0, 1]"),
        (["fit", "--config", "broken.yaml"], "config file broken.yaml is not valid YAML at line 3"),
        (["fit", "--config", "flat.yaml"], "config file flat.yaml: section trainer must be a mapping of its settings, got 5"),
        (["validate", "--config", SMOKE, "--ckpt_path", "noise.ckpt"], "is not a PyTorch checkpoint"),
        (fit + ["--trainer.default_root_dir", "/proc/run"], "lies in /proc"),
        (fit + ["--trainer.default_root_dir", "a_file/run"], "a_file is a file, not a directory"),
        (fit + ["--trainer.default_root_dir", "runs/b", "--data.replay_storage", "memmap",
                "--data.replay_dir", "/proc/replay"], "lies in /proc"),
        # checked before anything is written (each used to fail after setup, leaving files behind)
        (fit + ["--data.num_levels", "0"], "num_levels = 0 trains on every level"),
        (fit + ["--model.cuda_graph", "true"], "model.cuda_graph replays updates on a CUDA GPU; this run is on cpu"),
        (fit + ["--trainer.default_root_dir", "runs/c", "--data.replay_storage", "memmap",
                "--data.replay_capacity", "1000000000000"], "data.replay_capacity 1000000000000 needs 11444091.8 GiB"),
        (fit + ["--trainer.logger.init_args.tracking_uri", "sqlite:///bad.db"],
         "the MLflow store bad.db is not an SQLite database"),
        # one line, never a usage dump or Lightning's list of precisions
        (fit + ["--data.num_envs", "abc"], 'Parser key "data.num_envs": Expected a <class \'int\'>. Got value: abc'),
        (fit + ["--model.bogus", "3"], "unrecognized arguments: --model.bogus 3"),
        (fit + ["--trainer.precision", "banana"], "trainer.precision 'banana' is not supported; allowed: auto, 32-true"),
        (["fit", "--config", "empty.yaml"], "config file empty.yaml is empty"),
        (fit + ["--start_over", "true", "--ckpt_path", "last"], "--start_over true starts a new run and --ckpt_path"),
        (fit + ["--model.overrides", "{deter: 32}", "--ckpt_path", "last"], "overrides: checkpoint None, this run {'deter': 32}"),
    ]
    out = subprocess.run(
        [sys.executable, "-c", DRIVER, str(ROOT), json.dumps([args for args, _ in cases])],
        cwd=tmp_path, capture_output=True, text=True, timeout=900,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    for (args, expected), (code, stderr) in zip(cases, results):
        last = stderr.strip().splitlines()[-1] if stderr.strip() else ""
        assert code == 2, (args, code, stderr[-2000:])
        assert last.startswith("error: ") and expected in last, (args, last)
        assert "Traceback" not in stderr and "usage:" not in stderr, (args, stderr[-2000:])
    after = _hashes(tmp_path)
    assert after == before, {k for k in set(after) | set(before) if after.get(k) != before.get(k)}


def test_fit_episode_metrics_are_logged_once_at_the_step_they_ended(tmp_path):
    # bossfight: random play ends about 20 episodes in 768 env steps (coinrun's last longer than that)
    cwd = tmp_path
    cli(cwd, "fit", "--config", SMOKE, "--config", quick_checkpoints(cwd / "quick.yaml"),
        "--data.game", "bossfight", "--model.max_env_steps", "320", "--trainer.log_every_n_steps", "3")
    rows = (cwd / "runs" / "bossfight-tiny-seed0" / "episodes_rank0.csv").read_text().splitlines()[1:]
    played = sorted((int(r.split(",")[0]), float(r.split(",")[1])) for r in rows)
    client = mlflow.MlflowClient(f"sqlite:///{cwd / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("procgen-dreamer").experiment_id)
    logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, "episode/return"))
    assert logged == played and played, (logged, played)
    rates = [m.step for m in client.get_metric_history(run.info.run_id, "perf/updates_per_s")]
    assert rates and len(rates) == len(set(rates)), "a rate is logged once per window, not repeated"
    assert run.info.status == "FINISHED"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    record = json.loads((cwd / "runs" / "bossfight-tiny-seed0" / "mlflow_run.json").read_text())
    assert record["run_id"] == run.info.run_id


def test_run_files_sees_a_run_in_any_of_its_files(tmp_path):
    assert run_files(tmp_path / "missing") == [] and run_files(tmp_path) == []
    (tmp_path / "checkpoints").mkdir()
    assert run_files(tmp_path) == []  # an empty folder holds nothing to lose
    (tmp_path / "replay" / "rank0").mkdir(parents=True)
    (tmp_path / "replay" / "rank0" / "frames.bin").write_bytes(b"x")
    (tmp_path / "episodes_rank0.csv").write_text("")
    assert run_files(tmp_path) == ["replay", "episodes_rank0.csv"]


@pytest.mark.parametrize("change,message", [
    (dict(world_model={"lr": 1000.0}), "model.world_model.lr must lie in (0, 1], got 1000.0"),
    (dict(actor_critic={"gamma": 1.5}), "model.actor_critic.gamma must lie in (0, 1]"),
    (dict(actor_critic={"horizon": 2.5}), "model.actor_critic.horizon must be an integer"),
    (dict(max_env_steps=0), "model.max_env_steps must lie in [1, inf]"),
    (dict(actor_critic={"entropy": float("nan")}), "model.actor_critic.entropy must lie in [0, 1]"),
    (dict(norm="batch"), "unknown model.norm 'batch'; allowed: "),
    (dict(size="huge"), "unknown model size 'huge'"),
    (dict(overrides={"deter": 0}), "model.overrides.deter must be a positive integer"),
])
def test_dreamer_refuses_each_bad_argument_with_what_is_allowed(change, message):
    assert message in argument_problem({**_defaults(), **change})
    with pytest.raises(ValueError, match=re.escape(message)):
        Dreamer(**change)
    assert argument_problem(_defaults()) is None


@pytest.mark.parametrize("goals,message", [
    ({"strategy": "best"}, "unknown model.goals.strategy 'best'; allowed: value, replay"),
    ({"track": 1}, "unknown model.goals.track 1; allowed: False, True"),
    ({"space": "pixels"}, "unknown model.goals.space 'pixels'; allowed: deter, stoch, inverse, multistep"),
    ({"space_dim": 0}, "model.goals.space_dim must lie in [1, 4096], got 0"),
    ({"matcher_horizon": 0}, "model.goals.matcher_horizon must lie in [1, 1000], got 0"),
    ({"space": "multistep", "offset": 1}, "model.goals.space multistep learns from steps 2 or more apart"),
    (5, "model.goals must be a mapping of its knobs (space, space_dim, strategy, "),
])
def test_goal_dreamer_refuses_each_bad_goal_knob_and_plain_dreamer_has_none(goals, message):
    assert message in GoalDreamer.argument_problem({**_defaults(), "goals": goals})
    with pytest.raises(ValueError, match=re.escape(message)):
        GoalDreamer(goals=goals)
    with pytest.raises(TypeError):
        Dreamer(goals={})


def _defaults():
    import inspect

    return {k: p.default for k, p in inspect.signature(Dreamer.__init__).parameters.items() if k != "self"}


def test_a_diverging_loss_stops_the_run_naming_the_loss_before_any_weight_changes(tmp_path):
    torch.manual_seed(0)
    model = Dreamer(size="tiny")
    batch = {
        "obs": torch.zeros(2, 4, 64, 64, 3, dtype=torch.uint8),
        "action": torch.zeros(2, 4, dtype=torch.long),
        "reward": torch.tensor([[0.0, float("nan"), 0.0, 0.0]] * 2),
        "is_first": torch.tensor([[True, False, False, False]] * 2),
        "is_last": torch.zeros(2, 4, dtype=torch.bool),
        "is_terminal": torch.zeros(2, 4, dtype=torch.bool),
    }
    weights = {k: v.clone() for k, v in model.named_parameters()}
    trainer = pl.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    with pytest.raises(FloatingPointError, match=r"diverged at update 1 \(.*loss/reward = nan"):
        trainer.fit(model, train_dataloaders=torch.utils.data.DataLoader([batch] * 3, batch_size=None))
    for k, v in model.named_parameters():  # no optimiser step was taken
        assert torch.equal(v, weights[k]), k


def test_a_closed_env_raises_instead_of_crashing_and_closes_twice():
    env = ProcgenVectorEnv("coinrun", 2, num_levels=5, seed=0)
    env.reset()
    env.close()
    env.close()
    for call in (env.reset, lambda: env.step(np.zeros(2, np.int64)), env.render):
        with pytest.raises(RuntimeError, match="closed; make a new one"):
            call()


def test_a_checkpoint_that_cannot_be_written_leaves_no_partial_file_and_the_last_one_intact(tmp_path):
    import errno
    from types import SimpleNamespace

    from callbacks.training import EnvStepCheckpoint

    last = tmp_path / "last.ckpt"
    last.write_bytes(b"the last good checkpoint")

    def save_checkpoint(path, weights_only=False):  # a disk that fills half-way through
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    trainer = SimpleNamespace(save_checkpoint=save_checkpoint, is_global_zero=True)
    with pytest.raises(OSError, match=r"could not write checkpoint .*last.ckpt \(No space left on device\); "
                                      r"the earlier checkpoints are intact.*--ckpt_path last"):
        EnvStepCheckpoint(dirpath=str(tmp_path))._save_checkpoint(trainer, str(last))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert last.read_bytes() == b"the last good checkpoint"


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs POSIX file-size limits")
def test_a_disk_that_fills_mid_run_keeps_the_last_checkpoint_and_shows_the_first_error(tmp_path):
    checkpoints = tmp_path / RUN / "checkpoints"
    quick = quick_checkpoints(tmp_path / "quick.yaml", ("disk_probe.FillDiskAfterFirstCheckpoint",
                                                        {"checkpoint": str(checkpoints / "last.ckpt")}))
    out = cli(tmp_path, "fit", "--config", SMOKE, "--config", quick, "--model.max_env_steps", "100000",
              timeout=600, check=False, extra_path=[ROOT / "tests"])
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert re.fullmatch(r"error: could not write checkpoint \S+ \(File too large\); the earlier checkpoints "
                        r"are intact: .*--ckpt_path last.*", out.stderr.strip().splitlines()[-1])
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "mlruns", "quick.yaml", "runs"]
    assert not [p for p in tmp_path.rglob("*.tmp")], "no partial file stays behind"
    saved = torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["ReplayDataModule"]["env_steps"] > 0  # the first checkpoint, whole
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs(client.get_experiment_by_name("procgen-dreamer").experiment_id)
    assert run.info.status == "FAILED"


def test_the_run_logger_keeps_the_first_error_in_view_and_ends_the_run(tmp_path, capsys):
    from dreamer.tracking import RunLogger

    logger = RunLogger(experiment_name="e", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}")
    run_id = logger.run_id

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    logger._scan_and_log_checkpoints = full_disk
    logger._checkpoint_callback = object()
    try:
        raise OSError(28, "the run's own error")
    except OSError:
        logger.finalize("failed")  # as Lightning does, inside its handler of the run's error
    assert "MLflow could not finish the run's records" in capsys.readouterr().err
    assert logger.experiment.get_run(run_id).info.status == "FAILED"
    refused = RunLogger(experiment_name="e", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", run_id=run_id)
    assert refused.run_id == run_id
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        refused.finalize("failed")
    # a resumed run that was never reopened (its resume refused) keeps its status
    assert logger.experiment.get_run(run_id).info.status == "FAILED"
    resumed = RunLogger(experiment_name="e", tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", run_id=run_id)
    resumed.reopen()
    assert resumed.experiment.get_run(run_id).info.status == "RUNNING"
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        resumed.finalize("failed")
    assert resumed.experiment.get_run(run_id).info.status == "KILLED"


def test_module_knobs_reach_their_modules_and_bad_ones_are_refused():
    model = GoalDreamer(size="tiny", world_model={"unimix": 0.05, "scale_reward": 2.0, "lr": 2e-4},
                        actor_critic=ActorCriticKnobs(slow_rate=0.1, retnorm_decay=0.9, horizon=7, critic_lr=1e-4),
                        goals={"rollouts": 3, "strategy": "replay", "matcher_horizon": 5, "matcher_gamma": 0.9})
    assert model.world_model.hp.unimix == 0.05 and model.world_model.rssm.unimix == 0.05
    assert model.world_model.hp.scale_reward == 2.0 and model.world_model.hp.scale_dyn == 1.0  # default
    assert model.actor_critic.hp.slow_rate == 0.1 and model.actor_critic.hp.retnorm_decay == 0.9
    assert model.actor_critic.hp.horizon == 7 and model.goal_model.hp.horizon == 7
    assert model.goal_model.hp.rollouts == 3 and model.goal_model.hp.strategy == "replay"
    assert model.goal_matcher.hp.horizon == 5 and model.goal_matcher.hp.gamma == 0.9
    world_model_opt, _, critic_opt, _ = model.configure_optimizers()
    assert world_model_opt.defaults["lr"] == 2e-4 and critic_opt.defaults["lr"] == 1e-4
    assert model.hparams.world_model["scale_dyn"] == 1.0  # the checkpoint records every knob
    problem = argument_problem({**_defaults(), "actor_critic": {"slow_rat": 0.1}})
    assert problem.startswith("unknown model.actor_critic ['slow_rat']; allowed: horizon, gamma, ")
    assert "model.world_model.unimix must lie in [0, 1], got 2" in argument_problem(
        {**_defaults(), "world_model": {"unimix": 2}})


def test_a_checkpoint_of_the_flat_arguments_restores_into_the_groups():
    old = {"size": "tiny", "horizon": 9, "world_model_lr": 2e-4, "actor_critic_clip": 50.0,
           "track_goals": True, "goal_strategy": "replay", "world_model_args": {"unimix": 0.05},
           "actor_critic_args": {"slow_rate": 0.1}, "max_env_steps": 5}
    assert grouped(old) == {
        "size": "tiny", "max_env_steps": 5,
        "world_model": {"lr": 2e-4, "unimix": 0.05},
        "actor_critic": {"horizon": 9, "clip": 50.0, "slow_rate": 0.1},
        "goals": {"track": True, "strategy": "replay"},
    }
    state = GoalDreamer(size="tiny").state_dict()  # one class held the goal modules then
    agent = restore_agent({"hyper_parameters": old, "state_dict": state})
    assert isinstance(agent, GoalDreamer)  # it tracked goals
    assert agent.actor_critic.hp.horizon == 9 and agent.goals.acting.track and agent.world_model.hp.unimix == 0.05
    assert grouped(agent.hparams) == dict(agent.hparams)  # today's arguments pass unchanged


# ---------------------------------------------------------------- one process owns a run (issue 37)
HOLD = "import sys, time; sys.path.insert(0, sys.argv[1]); from dreamer.run_dir import lock_run; " \
       "assert lock_run(sys.argv[2]) is None; print('held', flush=True); time.sleep(600)"


def test_the_run_lock_names_its_holder_and_dies_with_it(tmp_path):
    from dreamer.run_dir import lock_path, lock_run, release_run

    run = tmp_path / "runs" / "a"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(ROOT), str(run)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        refused = lock_run(run)
        assert refused.startswith(f"process {holder.pid} (") and "since 20" in refused
        assert lock_path(run) == tmp_path / "runs" / ".a.lock" and not run.exists()  # nothing in the run dir
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops the lock with its process
        holder.wait()
    assert lock_run(run) is None and lock_run(run) is None  # taken, and held again by the same process
    release_run(run)


def test_a_second_process_on_a_live_run_is_refused_and_changes_nothing(tmp_path):
    # a live memmap run, stopped (SIGSTOP) while the others try: every file compared by hash
    quick = quick_checkpoints(tmp_path / "quick.yaml")
    base = ["fit", "--config", SMOKE, "--config", quick, "--data.replay_storage", "memmap"]
    proc = start_cli(tmp_path, *base, "--model.max_env_steps", "100000", stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / RUN
    last = run_dir / "checkpoints" / "last.ckpt"
    try:
        deadline = time.time() + 240
        while time.time() < deadline and not last.exists():
            time.sleep(0.5)
        assert last.exists(), "no checkpoint within 240 s"
        time.sleep(1.0)  # past the checkpoint's rename
        proc.send_signal(signal.SIGSTOP)
        before = _hashes(run_dir)
        for args, expected in [
            (base + ["--ckpt_path", "last"], f"error: {RUN} is in use by process {proc.pid} ("),
            (base + ["--start_over", "true"], f"error: {RUN} is in use by process {proc.pid} ("),
            (base, f"error: {RUN} is in use by process {proc.pid} ("),
            (base + ["--start_over", "true", "--ckpt_path", "last"], "error: --start_over true starts a new run"),
        ]:
            out = cli(tmp_path, *args, check=False)
            assert out.returncode == 2 and out.stderr.strip().splitlines()[-1].startswith(expected), out.stderr[-2000:]
        # a reader is never blocked: validate scores the live memmap run's checkpoint from its own directory
        out = cli(tmp_path, "validate", "--config", SMOKE, "--ckpt_path", str(last.relative_to(tmp_path)))
        assert "unseen_levels" in out.stdout and (tmp_path / "runs" / "coinrun-tiny-seed0-validate").is_dir()
        assert _hashes(run_dir) == before
        proc.send_signal(signal.SIGCONT)
        time.sleep(2.0)
    finally:
        proc.send_signal(signal.SIGCONT)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "stopped by Ctrl-C; resume from the last checkpoint with --ckpt_path last"
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {r.info.run_name: r for r in client.search_runs(client.get_experiment_by_name("procgen-dreamer").experiment_id)}
    assert runs["coinrun-tiny-seed0"].info.status == "KILLED"
    assert runs["coinrun-tiny-seed0-validate"].info.status == "FINISHED"


def test_a_finished_run_stays_finished_and_a_moved_one_keeps_writing_last_ckpt(smoke_run, tmp_path):
    src, _ = smoke_run
    shutil.copytree(src / "runs" / "coinrun-tiny-seed0", tmp_path / "runs" / "moved")
    shutil.copy(src / "mlflow.db", tmp_path / "mlflow.db")
    moved = ["fit", "--config", SMOKE, "--trainer.default_root_dir", "runs/moved", "--ckpt_path", "last"]
    before = _hashes(tmp_path / "runs")
    out = cli(tmp_path, *moved)  # the smoke config's own max_env_steps: nothing to do
    assert "is finished: 768 env steps, and this command's model.max_env_steps is 768; nothing changed" in out.stdout
    assert _hashes(tmp_path / "runs") == before
    cli(tmp_path, *moved, "--model.max_env_steps", "832", "--trainer.limit_val_batches", "0",
        "--dream_pictures.enabled", "false")
    checkpoints = tmp_path / "runs" / "moved" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["last.ckpt"]  # no last-v1.ckpt shadow
    assert torch.load(checkpoints / "last.ckpt", map_location="cpu", weights_only=False)["ReplayDataModule"]["env_steps"] >= 832


def test_a_start_that_failed_before_its_first_checkpoint_is_not_a_run(tmp_path):
    # what a start killed (or failed) before its first checkpoint leaves: a record, a replay, an MLflow run RUNNING
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("procgen-dreamer")).info.run_id
    run_dir = tmp_path / RUN
    (run_dir / "replay" / "rank0").mkdir(parents=True)
    (run_dir / "replay" / "rank0" / "frames.bin").write_bytes(b"x" * 100)
    (run_dir / "mlflow_run.json").write_text(json.dumps({"run_id": run_id, "tracking_uri": "sqlite:///mlflow.db"}))
    # a Lightning misconfiguration fails after the claim: one line, and the leftovers were moved aside
    out = cli(tmp_path, "fit", "--config", SMOKE, "--trainer.devices", "0", check=False)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and last.startswith("error: `Trainer(devices='0')` value is not a valid input"), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "held no checkpoint" in out.stderr
    aside = tmp_path / "runs" / "coinrun-tiny-seed0.old"
    assert (aside / "replay" / "rank0" / "frames.bin").read_bytes() == b"x" * 100  # nothing deleted
    assert client.get_run(run_id).info.status == "FAILED"
    assert not run_dir.exists() or not run_files(run_dir)


def test_no_checkpoint_holds_non_finite_weights_and_a_divergence_names_the_last_finite_one(tmp_path):
    from types import SimpleNamespace

    from callbacks.training import EnvStepCheckpoint

    model = Dreamer(size="tiny")
    optimizers = model.configure_optimizers()[:1]
    callback = EnvStepCheckpoint(dirpath=str(tmp_path))
    callback._saved_at = 512
    with torch.no_grad():
        next(model.world_model.reward_head.parameters()).view(-1)[0] = float("nan")
    trainer = SimpleNamespace(lightning_module=model, optimizers=optimizers)
    with pytest.raises(FloatingPointError, match=r"weight world_model\.reward_head\.\S+ holds non-finite values "
                                                 r"after update 0; nothing was saved, and \S+last\.ckpt \(512 env "
                                                 r"steps\) holds the last finite state"):
        callback._save_now(trainer)
    assert list(tmp_path.iterdir()) == []
    diverged = FloatingPointError("the loss diverged at update 9 (loss/reward = nan); the run stopped")
    callback.on_exception(trainer, model, diverged)
    assert str(diverged).endswith(f"(the last checkpoint: {tmp_path / 'last.ckpt'} (512 env steps))")


def test_a_collapsed_model_stops_the_run_in_one_line(tmp_path):
    # learning rate 1, the top of the allowed range: reward, continue and critic losses freeze at 0
    out = cli(tmp_path, "fit", "--config", SMOKE, "--model.world_model.lr", "1", "--model.actor_critic.actor_lr", "1",
              "--model.actor_critic.critic_lr", "1", "--trainer.log_every_n_steps", "2", check=False)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert last.startswith("error: training collapsed: ") and "did not change in 5 logs" in last, last
    assert "model.world_model.lr 1, model.actor_critic.actor_lr 1, critic_lr 1" in last


def test_a_resume_from_an_older_checkpoint_logs_to_a_new_mlflow_run_tagged_with_its_origin(tmp_path):
    quick = quick_checkpoints(tmp_path / "quick.yaml")
    args = ["fit", "--config", SMOKE, "--config", quick, "--checkpoint.keep_every", "true"]
    cli(tmp_path, *args, "--model.max_env_steps", "256")
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (first,) = client.search_runs(client.get_experiment_by_name("procgen-dreamer").experiment_id)
    older = tmp_path / RUN / "checkpoints" / "env_steps=128.ckpt"
    assert older.is_file()
    out = cli(tmp_path, *args, "--model.max_env_steps", "320", "--ckpt_path", str(older))
    assert "is older than the run's newest checkpoint (256 env steps)" in out.stderr
    runs = client.search_runs(first.info.experiment_id)
    (branch,) = [r for r in runs if r.info.run_id != first.info.run_id]
    assert branch.data.tags["branched_from_run"] == first.info.run_id
    assert branch.data.tags["branched_at_env_steps"] == "128"
    steps = [m.step for m in client.get_metric_history(first.info.run_id, "loss/world_model")]
    assert max(steps) <= 256  # the first run keeps only what it trained
    record = json.loads((tmp_path / RUN / "mlflow_run.json").read_text())
    assert record["run_id"] == branch.info.run_id  # later resumes continue the branch


def test_start_over_moves_only_the_run_directory_aside(smoke_run, tmp_path):
    src, _ = smoke_run
    shutil.copytree(src / "runs", tmp_path / "runs")
    (tmp_path / "other" / "replay" / "rank0").mkdir(parents=True)
    (tmp_path / "other" / "replay" / "rank0" / "frames.bin").write_bytes(b"another run's")
    before = _hashes(tmp_path)
    out = cli(tmp_path, "fit", "--config", SMOKE, "--start_over", "true", "--data.replay_storage", "memmap",
              "--data.replay_dir", "other/replay", check=False)
    assert out.returncode == 2 and "holds a replay, and --start_over moves only runs/coinrun-tiny-seed0" in out.stderr
    assert _hashes(tmp_path) == before
    # (devices 0 fails once the directory is claimed: the move is what is looked at)
    out = cli(tmp_path, "fit", "--config", SMOKE, "--start_over", "true", "--trainer.devices", "0", check=False)
    assert f"start over: moved the earlier run's {RUN} to {RUN}.old" in out.stdout
    moved = _hashes(tmp_path / "runs" / "coinrun-tiny-seed0.old")
    prefix = "runs/coinrun-tiny-seed0/"
    assert moved == {k[len(prefix):]: v for k, v in before.items() if k.startswith(prefix)}
