"""The layout's floor: the installed packages import without circles, ``dreamer/`` imports neither
``callbacks/`` nor ``datamodules/``, and only the goal framework itself, the dream callbacks and
the CLI wiring import ``dreamer.goals`` (``benchmarks/layout_survey.py`` holds the rules); each
rule is shown to fail on a planted case."""

import os
import shutil
import sys
import textwrap

import pytest
from clirun import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import layout_survey  # noqa: E402


def test_the_installed_packages_keep_the_import_rules():
    graph = layout_survey.import_graph()
    assert {"dreamer.agent", "dreamer.goals.agent", "callbacks.dreams", "cli"} <= set(graph)
    assert "dreamer.agent" in graph["dreamer.goals.agent"]  # the extension imports the core...
    assert not any(target.startswith("dreamer.goals") for target in graph["dreamer.agent"])  # ...never back
    assert layout_survey.rule_breaks(graph) == []


@pytest.mark.parametrize("graph, expected", [
    ({"dreamer.a": {"dreamer.b"}, "dreamer.b": {"dreamer.c"}, "dreamer.c": {"dreamer.a"}},
     "import circle: dreamer.a -> dreamer.b -> dreamer.c"),
    ({"dreamer.agent": {"callbacks.training"}, "callbacks.training": set()},
     "dreamer.agent imports callbacks.training: dreamer/ must not import callbacks/"),
    ({"dreamer.visuals": {"datamodules.collector"}, "datamodules.collector": set()},
     "dreamer.visuals imports datamodules.collector: dreamer/ must not import datamodules/"),
    ({"demo": {"dreamer.goals.agent"}, "dreamer.goals.agent": set()},
     "demo imports dreamer.goals.agent: only callbacks.dreams"),
])
def test_each_rule_flags_a_planted_break(graph, expected):
    breaks = layout_survey.rule_breaks(graph)
    assert len(breaks) == 1 and breaks[0].startswith(expected), breaks


def test_imports_inside_functions_and_relative_imports_count(tmp_path, monkeypatch):
    package = tmp_path / "dreamer"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "b.py").write_text("")
    (package / "a.py").write_text(textwrap.dedent("""
        def late():
            from callbacks.training import TrainingLog  # noqa
            from . import b  # noqa
    """))
    monkeypatch.setattr(layout_survey, "ROOT", tmp_path)
    known = {"dreamer", "dreamer.a", "dreamer.b", "callbacks.training"}
    assert layout_survey.imported_modules(package / "a.py", known) == {"callbacks.training", "dreamer.b"}


def test_a_non_editable_install_holds_every_package_and_imports_the_goal_extension(tmp_path):
    import subprocess

    source, target = tmp_path / "source", tmp_path / "site"  # built from a copy: setuptools writes build/ there
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "build", "*.egg-info",
                                                                "__pycache__", "test-artifacts", "gpu_carry"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=300)
    probe = ("import dreamer, dreamer.goals, callbacks.goal_metrics, cli; "
             "from dreamer.goals import GoalDreamer; print(dreamer.__file__); print(GoalDreamer.__module__)")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(target)})
    assert out.returncode == 0, out.stderr[-2000:]
    where, module = out.stdout.split()
    assert where.startswith(str(target)) and module == "dreamer.goals.agent"
    assert not (target / "experiments").exists() and not (target / "tests").exists()  # the lab stays out
