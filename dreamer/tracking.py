"""Experiment tracking: the MLflow logger of a run, and logging facts once, at the step they happened."""

from __future__ import annotations

import sys
from typing import Any, Iterable, Mapping

from pytorch_lightning.loggers import Logger, MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only

from dreamer.compat import mlflow_ids

# MLflow 3 opens experiments without this tag in its GenAI view, which shows no training runs
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


class RunLogger(MLFlowLogger):
    """``MLFlowLogger`` for training runs.

    The experiment opens in MLflow's model-training view. A run given by ``run_id`` (a resume)
    keeps its status until ``reopen()`` (called once the checkpoint is restored) marks it RUNNING,
    so a refused resume leaves it as it was. A run stopped by Ctrl-C or SIGTERM ends KILLED, one
    that raised FAILED.
    """

    _prepared = False
    _resumed = False  # a run_id was given: the run existed before this process
    _reopened = False

    @property
    def experiment(self):  # noqa: D401 - Lightning's property, extended
        if not self._prepared and mlflow_ids(self)[0] is not None:
            self._resumed = True
        client = MLFlowLogger.experiment.fget(self)
        run_id, experiment_id = mlflow_ids(self)
        if not self._prepared and client is not None and run_id is not None:
            self._prepared = True
            experiment = client.get_experiment(experiment_id)
            for key, value in EXPERIMENT_KIND.items():
                if experiment.tags.get(key) != value:
                    client.set_experiment_tag(experiment_id, key, value)
        return client

    @rank_zero_only
    def reopen(self) -> None:
        """Mark a resumed run RUNNING again (it may have ended FAILED, KILLED or, killed hard, never)."""
        client = self.experiment  # first access: learns whether the run existed before
        if self._resumed and not self._reopened:
            self._reopened = True
            client.update_run(self.run_id, status="RUNNING")

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if self._resumed and not self._reopened:
            return  # the resume was refused before it began: the run stays as it was
        in_flight = sys.exc_info()[1]  # Lightning finalizes inside its handler of the run's error
        if status == "failed" and _is_interrupt(in_flight):
            status = "KILLED"
        try:
            super().finalize(status)
        except Exception as e:  # noqa: BLE001
            if in_flight is None:
                raise
            # e.g. a full disk that also stops MLflow from copying the checkpoints: the run's own
            # error stays the one shown, and the run is still marked as ended
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            print(f"warning: MLflow could not finish the run's records ({first})", file=sys.stderr)
            try:
                self.experiment.set_terminated(self.run_id, {"failed": "FAILED"}.get(status, status))
            except Exception:  # noqa: BLE001
                pass


def _is_interrupt(exception: BaseException | None) -> bool:
    # Lightning turns SIGTERM into SIGTERMException (a subclass of SystemExit in older versions)
    return isinstance(exception, KeyboardInterrupt) or type(exception).__name__ == "SIGTERMException"


def run_exists(tracking_uri: str, run_id: str) -> bool:
    """Whether the MLflow store at ``tracking_uri`` holds run ``run_id``."""
    import mlflow

    try:
        mlflow.MlflowClient(tracking_uri).get_run(run_id)
    except Exception:  # noqa: BLE001 - a missing store, run or permission all mean "start a new run"
        return False
    return True


@rank_zero_only
def log_points(loggers: Iterable[Logger], points: Iterable[tuple[int, Mapping[str, float]]]) -> None:
    """Log each ``(step, metrics)`` once at its own step, to every logger.

    For facts that happen at their own moment (an episode ending, a rate measured over a window):
    ``LightningModule.log`` would repeat the latest value at every later logging step.
    """
    points = [(int(step), {k: float(v) for k, v in metrics.items()}) for step, metrics in points]
    if not points:
        return
    for logger in loggers:
        if isinstance(logger, MLFlowLogger):
            _mlflow_batch(logger, points)
        else:
            for step, metrics in points:
                logger.log_metrics(metrics, step=step)


def _mlflow_batch(logger: MLFlowLogger, points: list[tuple[int, dict[str, float]]]) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, step) for step, values in points for key, value in values.items()]
    for i in range(0, len(metrics), 1000):  # MLflow's limit per batch
        logger.experiment.log_batch(logger.run_id, metrics=metrics[i:i + 1000])


def params_to_log(logger: MLFlowLogger, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split ``params`` into those the run does not hold yet and those it holds with another value
    (MLflow refuses to change a param, e.g. a larger ``max_env_steps`` on resume)."""
    held = logger.experiment.get_run(logger.run_id).data.params
    new = {k: v for k, v in params.items() if k not in held}  # values as MLFlowLogger writes them
    changed = {k: v for k, v in params.items() if k in held and held[k] != str(v)[:250]}
    return new, changed
