"""The private attributes of other libraries that dreamer/compat.py relies on still exist in the
installed versions: an upgrade that removes one fails here, by name."""

import ast
import inspect

import numpy as np
import pytest
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.cli import LightningCLI
from pytorch_lightning.loggers import MLFlowLogger
from torch.nn.parallel import DistributedDataParallel

from dreamer import compat


def _layout_survey():
    import sys

    from clirun import ROOT

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import layout_survey

    return layout_survey


def test_no_private_attribute_of_another_library_is_used_outside_compat():
    assert _layout_survey().private_uses() == []


def test_a_planted_private_use_outside_compat_is_flagged(tmp_path, monkeypatch):
    survey = _layout_survey()
    (tmp_path / "dreamer").mkdir()
    planted = tmp_path / "dreamer" / "planted.py"
    planted.write_text("def f(optimizer):\n    self_made = 1\n    optimizer._on_before_step()\n    return self_made\n")
    monkeypatch.setattr(survey, "ROOT", tmp_path)
    assert survey.private_uses([planted]) == ["dreamer/planted.py:3 _on_before_step"]


def test_every_private_attribute_compat_reads_is_listed_with_its_reason():
    from pathlib import Path

    survey = _layout_survey()
    source = Path(compat.__file__)
    own = survey.defined_names(survey.installed_files()) - {"_ddp_params_and_buffers_to_ignore"}
    read = {node.attr for node in ast.walk(ast.parse(source.read_text()))
            if isinstance(node, ast.Attribute) and node.attr.startswith("_")
            and not node.attr.startswith("__") and node.attr not in own}
    listed = " ".join(attributes for _, attributes, _ in compat.PRIVATE)
    assert read and all(name in listed for name in read), sorted(name for name in read if name not in listed)


def test_lightning_optimizer_still_counts_steps_in_the_hooks_we_call():
    import torch
    from pytorch_lightning.core.optimizer import LightningOptimizer

    wrapped = LightningOptimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], 0.1))
    step = inspect.getsource(LightningOptimizer.step)
    for name in ("_on_before_step", "_on_after_step"):
        assert callable(getattr(wrapped, name, None)) and f"self.{name}()" in step, f"LightningOptimizer.{name} is gone"


def test_ddp_still_reads_the_ignore_list():
    assert "_ddp_params_and_buffers_to_ignore" in inspect.getsource(DistributedDataParallel)


@pytest.mark.parametrize("space", ["deter", "inverse"])
def test_ddp_leaves_the_goal_matcher_goal_space_and_goal_banks_alone_and_nothing_else(space):
    from dreamer.goals import GoalDreamer

    model = GoalDreamer(size="tiny", goals={"space": space})
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
