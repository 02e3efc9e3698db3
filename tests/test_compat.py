"""The private attributes of other libraries that dreamer/compat.py relies on still exist in the
installed versions: an upgrade that removes one fails here, by name."""

import inspect

import numpy as np
import pytest
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import MLFlowLogger
from torch.nn.parallel import DistributedDataParallel

from dreamer import compat


def test_every_private_attribute_in_the_list_is_checked_here():
    checked = {"torch.nn.parallel.DistributedDataParallel", "pytorch_lightning.loggers.MLFlowLogger",
               "pytorch_lightning.callbacks.ModelCheckpoint", "pytorch_lightning.cli.LightningCLI",
               "procgen.ProcgenGym3Env (gym3)", "numpy.memmap"}
    assert {where for where, _, _ in compat.PRIVATE} == checked


def test_ddp_still_reads_the_ignore_list():
    assert "_ddp_params_and_buffers_to_ignore" in inspect.getsource(DistributedDataParallel)


@pytest.mark.parametrize("space", ["deter", "inverse"])
def test_ddp_leaves_the_goal_matcher_goal_space_and_goal_banks_alone_and_nothing_else(space):
    from dreamer.agent import Dreamer

    model = Dreamer(size="tiny", goals={"space": space})
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    matcher = {f"goal_matcher.{name}" for name, _ in [*model.goal_matcher.named_parameters(),
                                                      *model.goal_matcher.named_buffers()]}
    learned_space = {f"goal_model.space.{name}" for name, _ in model.goal_model.space.named_parameters()}
    banks = {"goal_model.bank_start", "goal_model.bank_goal", "goal_model.bank_path", "goal_model.bank_count"}
    assert {"goal_matcher.ac.actor.0.weight", "goal_matcher.ac.critic.0.weight", "goal_matcher.ac.ret_lo"} <= matcher
    assert ("goal_model.space.proj.weight" in learned_space) == (space == "inverse")
    assert ignored == matcher | learned_space | banks


def test_mlflow_logger_still_holds_its_ids_before_creating_a_run(tmp_path):
    logger = MLFlowLogger(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", run_id="abc")
    assert compat.mlflow_ids(logger) == ("abc", None)
    fresh = MLFlowLogger(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    assert compat.mlflow_ids(fresh) == (None, None)


@pytest.mark.parametrize("name", ["_monitor_candidates", "_save_topk_checkpoint", "_save_last_checkpoint",
                                  "_save_checkpoint"])
def test_model_checkpoint_still_has_the_methods_env_step_checkpoint_uses(name):
    assert callable(getattr(ModelCheckpoint, name, None)), f"ModelCheckpoint.{name} is gone"


def test_lightning_cli_still_parses_the_checkpoint_path_in_the_method_we_override():
    assert callable(getattr(LightningCLI, "_parse_ckpt_path", None))
    assert "_parse_ckpt_path" in inspect.getsource(LightningCLI)


def test_procgen_buffers_are_the_ones_its_observations_come_from():
    from datamodules.procgen import raw_procgen_env

    env = raw_procgen_env(num=2, env_name="coinrun", rand_seed=0)
    buf = compat.gym3_buffers(env)
    _, obs, first = env.observe()
    np.testing.assert_array_equal(buf.obs, obs["rgb"])
    np.testing.assert_array_equal(buf.first, first)
    assert buf.action.shape[0] == 2 and buf.level_seed.shape == (2,) and buf.level_complete.shape == (2,)
    env.close()


def test_memmap_pages_can_be_released_and_the_data_stays(tmp_path):
    array = np.memmap(tmp_path / "a.bin", dtype=np.uint8, mode="w+", shape=(1 << 16,))
    array[:] = 7
    compat.release_memmap_pages(array)
    assert int(array.sum()) == 7 << 16
