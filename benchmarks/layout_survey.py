"""The project's shape in figures: lines per package, the installed knob count, and the import
graph of the installed packages (circles, imports that run backwards, who imports the goal
extension).

    python benchmarks/layout_survey.py            # all three
    python benchmarks/layout_survey.py --no-knobs # without the two ``--print_config`` runs (~10 s)

The import rules are the floor ``tests/test_layout.py`` holds: no circle, nothing in ``dreamer/``
imports ``callbacks`` or ``datamodules``, and ``dreamer.goals`` is imported only by itself, the
dream callbacks and the CLI wiring. Function-level imports count like top-level ones.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("dreamer", "datamodules", "callbacks")  # installed with cli.py and demo.py
TOP_MODULES = ("cli", "demo")
GOALS = "dreamer.goals"
GOAL_IMPORTERS = ("callbacks.dreams", "callbacks.goal_metrics", "cli")  # besides dreamer.goals itself


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def installed_files() -> list[Path]:
    files = [ROOT / f"{m}.py" for m in TOP_MODULES]
    for package in PACKAGES:
        files += sorted((ROOT / package).rglob("*.py"))
    return files


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The project modules ``path`` imports anywhere in it (functions included): for ``from a.b
    import c`` the module ``a.b.c`` when it is one, else ``a.b``."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # `import a.b.c` of a module: its nearest known parent
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    """{module: the project modules it imports} over the installed files."""
    files = installed_files()
    known = {module_name(f) for f in files}
    return {module_name(f): imported_modules(f, known) - {module_name(f)} for f in files}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles: strongly connected groups of two or more modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def rule_breaks(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the layout's rules, one line each."""
    breaks = [f"import circle: {' -> '.join(group)}" for group in circles(graph)]
    for module, targets in sorted(graph.items()):
        for target in sorted(targets):
            top = target.split(".")[0]
            if module.split(".")[0] == "dreamer" and top in ("callbacks", "datamodules"):
                breaks.append(f"{module} imports {target}: dreamer/ must not import {top}/")
            inside_goals = module == GOALS or module.startswith(GOALS + ".")
            if (target == GOALS or target.startswith(GOALS + ".")) and not inside_goals \
                    and module not in GOAL_IMPORTERS:
                breaks.append(f"{module} imports {target}: only {', '.join(GOAL_IMPORTERS)} may import {GOALS}")
    return breaks


COMPAT = "dreamer/compat.py"  # the one place that may use other libraries' private attributes


def defined_names(files: list[Path]) -> set[str]:
    """Every name the project's own source defines: functions, classes, arguments, assigned
    names and attributes assigned (``self._x = ...``)."""
    names: set[str] = set()
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, ast.arg):
                names.add(node.arg)
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)
    return names


def private_uses(files: list[Path] | None = None) -> list[str]:
    """``file:line attribute`` for each ``_``-prefixed attribute (not ``__dunder__``) read outside
    ``dreamer/compat.py`` that the project's own source does not define: another library's
    private API, which belongs in ``dreamer/compat.py``."""
    files = installed_files() if files is None else files
    own = defined_names(files)
    found = []
    for path in files:
        if path.relative_to(ROOT).as_posix() == COMPAT:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and node.attr not in own:
                found.append(f"{path.relative_to(ROOT).as_posix()}:{node.lineno} {node.attr}")
    return found


def lines_per_package() -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for path in installed_files():
        counts[module_name(path).split(".")[0]] += len(path.read_text().splitlines())
    for folder in ("benchmarks", "experiments", "tests"):
        for path in (ROOT / folder).rglob("*.py") if (ROOT / folder).is_dir() else ():
            counts[folder] += len(path.read_text().splitlines())
    return dict(counts)


def leaves(tree, prefix: str = "", lists: bool = False) -> dict[str, object]:
    """``{"a.b": value}`` of a nested mapping; with ``lists`` the mappings inside lists too."""
    if isinstance(tree, dict):
        out: dict[str, object] = {}
        for key, value in tree.items():
            out.update(leaves(value, f"{prefix}{key}.", lists))
        return out
    if lists and isinstance(tree, list):
        out = {}
        for i, value in enumerate(tree):
            out.update(leaves(value, f"{prefix}{i}.", lists))
        return out
    return {prefix[:-1]: tree}


# sections the CLI adds for this project's always-on callbacks: only the knobs their own classes
# declare count (the rest are Lightning's ModelCheckpoint's and progress bar's, like trainer.*)
SECTIONS = {"checkpoint": "callbacks.training.EnvStepCheckpoint",
            "progress_bar": "callbacks.training.EnvStepProgressBar",
            "dream_pictures": "callbacks.visualize.DreamVisualizer"}
NOT_KNOBS = ("__default_config__", "ckpt_path", "weights_only", "optimizer", "lr_scheduler")  # LightningCLI's
SET_BY_THE_CLI = ("model.num_actions", "model.obs_shape")  # the env's sizes (cli.py ENV_SPACES)


def own_parameters(class_path: str) -> set[str]:
    """The named parameters a project class's own ``__init__`` declares."""
    import importlib
    import inspect

    module, _, name = class_path.rpartition(".")
    sys.path.insert(0, str(ROOT))
    cls = getattr(importlib.import_module(module), name)
    return {p.name for p in inspect.signature(cls.__init__).parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def knobs(configs: list[str]) -> set[str]:
    """The installed knobs the fit parser shows with ``configs``: ``--print_config``'s settings less
    ``trainer.*`` and LightningCLI's own, the always-on callback sections' own knobs, and the init
    arguments of this project's callbacks in ``trainer.callbacks``; a subclass's ``init_args``
    prefix dropped (``model.size``)."""
    args = [sys.executable, str(ROOT / "cli.py"), "fit", *(a for c in configs for a in ("--config", c)),
            "--print_config"]
    text = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    tree = yaml.safe_load(text)
    found: set[str] = set()
    for section, value in tree.items():
        if section == "trainer" or section in NOT_KNOBS:
            continue
        keys = {k.replace(".init_args.", ".") for k in leaves({section: value}) if not k.endswith("class_path")}
        if section in SECTIONS:
            own = own_parameters(SECTIONS[section])
            keys = {k for k in keys if k.split(".")[1] in own}
        found |= keys - set(SET_BY_THE_CLI)
    for callback in tree.get("trainer", {}).get("callbacks") or []:
        name = callback.get("class_path", "")
        if name.split(".")[0] == "callbacks":
            found |= {f"{name}.{k}" for k in (callback.get("init_args") or {})}
    return found


def unset_knobs(found: set[str]) -> list[str]:
    """The knobs no shipped config (``configs/``) and no test (``tests/``) sets: by the knob's last
    name, as a YAML key in a config, or in a test as a flag (``.name``), keyword (``name=``) or key."""
    configs = [yaml.safe_load(p.read_text()) or {} for p in (ROOT / "configs").rglob("*.yaml")]
    keys: set[str] = set()
    for tree in configs:
        keys |= {part for k in leaves(tree, lists=True) for part in k.split(".")}
    tests = "\n".join(p.read_text() for p in (ROOT / "tests").rglob("*.py"))
    unset = []
    for knob in sorted(found):
        name = knob.rsplit(".", 1)[-1]
        if name in keys or any(f"{pattern}" in tests for pattern in (f".{name}", f"--{name}", f"{name}=", f'"{name}"')):
            continue
        unset.append(knob)
    return unset


def installed_knobs() -> set[str]:
    """Every knob a shipped class offers: the plain run's and the goal extension's (configs/dreams.yaml)."""
    return knobs([]) | knobs(["configs/dreams.yaml"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-knobs", action="store_true", help="skip the knob count (two --print_config runs)")
    args = parser.parse_args()
    print("lines per package:")
    for package, count in sorted(lines_per_package().items(), key=lambda kv: -kv[1]):
        print(f"  {package:<12} {count:>6}")
    graph = import_graph()
    print(f"import graph: {len(graph)} installed modules, {sum(map(len, graph.values()))} imports")
    breaks = rule_breaks(graph)
    print(f"rule breaks: {len(breaks)}")
    for line in breaks:
        print(f"  {line}")
    private = private_uses()
    print(f"private attributes of other libraries outside {COMPAT}: {len(private)}")
    for line in private:
        print(f"  {line}")
    if not args.no_knobs:
        found = installed_knobs()
        groups: dict[str, int] = defaultdict(int)
        for key in found:
            head = key.split(".")
            groups[".".join(head[:2]) if head[0] == "model" and len(head) > 2 else head[0]] += 1
        print(f"installed knobs: {len(found)} ({', '.join(f'{g} {n}' for g, n in sorted(groups.items()))})")
        unset = unset_knobs(found)
        print(f"set by no shipped config or test: {len(unset)}{': ' if unset else ''}{', '.join(unset)}")


if __name__ == "__main__":
    main()
