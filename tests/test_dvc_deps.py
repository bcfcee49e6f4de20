"""dvc.yaml lists, for every stage, the pipeline/ code its command runs.

The import closure of a stage's command is computed from the source (ast): the imports of the
`clean` command's function and of the cli/ helpers it calls, then every import (top level and
inside functions) of each pipeline/ module reached, and the modules of a registry
(pipeline/registry.py `modules`, imported on first use) where its entries run (`REG[name].fn`,
`REG.families()`). Where a module reads a registry's entries without running them (a score's
suspicious end, the column list) the registry's modules count with their top-level imports.
Not counted: params validation reading the allowed names (params.py, config.py) and cli/'s
top-level imports (help texts) — they never change a stage's outputs. A stage's deps cover a
module when they list its file or a folder above it. Editing a module a stage runs must make
`dvc repro` re-run that stage.
"""
from __future__ import annotations

import ast
import importlib.util
import shlex
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from pipeline import registry

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
#: modules that read a registry's names only to validate params (never what an entry does)
NAMES_ONLY = {"pipeline.params", "pipeline.config"}
REGISTRIES = {name: reg for name, reg in vars(registry).items() if isinstance(reg, registry.Registry)}


def _file(module: str) -> Path | None:
    """The source file of a module of this repository (None for outside modules)."""
    base = ROOT.joinpath(*module.split("."))
    for f in (base.with_suffix(".py"), base / "__init__.py"):
        if f.is_file():
            return f
    return None


@lru_cache(maxsize=None)
def _tree(module: str) -> ast.Module:
    return ast.parse(_file(module).read_text())


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    pkg = module if _file(module).name == "__init__.py" else module.rsplit(".", 1)[0]
    for _ in range(node.level - 1):
        pkg = pkg.rsplit(".", 1)[0]
    return f"{pkg}.{node.module}" if node.module else pkg


def _runs(module: str, name: str) -> bool:
    """True when `module` runs the entries of registry `name` (`NAME[...].fn` or `NAME.families()`)."""
    for n in ast.walk(_tree(module)):
        if isinstance(n, ast.Attribute) and n.attr in ("fn", "families"):
            v = n.value.value if isinstance(n.value, ast.Subscript) else n.value
            if isinstance(v, ast.Name) and v.id == name:
                return True
    return False


def _imports_in(module: str, nodes, runs: list | None = None, names: list | None = None) -> set[str]:
    """Repository modules imported by the import statements among `nodes` (ast nodes, walked).
    For `from pipeline.registry import NAME`: the registry's modules go to `runs` when `module`
    runs its entries, else to `names` (it reads the names only)."""
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            out.add(base)
            for a in node.names:
                if _file(f"{base}.{a.name}"):
                    out.add(f"{base}.{a.name}")
                if base == "pipeline.registry" and a.name in REGISTRIES:
                    into = runs if _runs(module, a.name) else names
                    if into is not None:
                        into += REGISTRIES[a.name].modules
    return {m for m in out if m.split(".")[0] in ("pipeline", "cli") and _file(m)}


def _top_level_imports(module: str) -> set[str]:
    """Top-level imports of `module` (a registry's modules not included)."""
    return _imports_in(module, [n for n in _tree(module).body if isinstance(n, (ast.Import, ast.ImportFrom))])


def _functions(module: str) -> dict[str, ast.FunctionDef]:
    return {n.name: n for n in _tree(module).body if isinstance(n, ast.FunctionDef)}


def _aliases(module: str) -> dict[str, tuple[str, str]]:
    """name → (module, function) for `from .x import f` / `name = mod.f` at a cli module's top level."""
    out = {}
    for n in _tree(module).body:
        if isinstance(n, ast.ImportFrom):
            for a in n.names:
                out[a.asname or a.name] = (_resolve(module, n), a.name)
        elif isinstance(n, ast.Import):
            for a in n.names:
                out[a.asname or a.name] = (a.name, None)
        elif (isinstance(n, ast.Assign) and len(n.targets) == 1 and isinstance(n.targets[0], ast.Name)
              and isinstance(n.value, ast.Attribute) and isinstance(n.value.value, ast.Name)):
            out[n.targets[0].id] = ("@" + n.value.value.id, n.value.attr)
    return out


def _command_imports(module: str, fn: str, seen: set | None = None) -> set[str]:
    """Modules imported by cli function `fn` of `module` and by the cli functions it references."""
    seen = set() if seen is None else seen
    if (module, fn) in seen or fn not in _functions(module):
        return set()
    seen.add((module, fn))
    node = _functions(module)[fn]
    out = _imports_in(module, ast.walk(node))
    aliases = _aliases(module)
    local = {a.arg for a in node.args.args + node.args.kwonlyargs} | {
        n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    for ref in ast.walk(node):
        if isinstance(ref, ast.Name) and ref.id in local:
            continue
        if isinstance(ref, ast.Name):
            if ref.id in _functions(module):
                out |= _command_imports(module, ref.id, seen)
            elif ref.id in aliases:
                mod, name = aliases[ref.id]
                if mod.startswith("@"):  # name = alias.attr
                    mod = aliases.get(mod[1:], (None,))[0]
                if mod and mod.startswith("cli") and name:
                    out |= _command_imports(mod, name, seen)
        elif isinstance(ref, ast.Attribute) and isinstance(ref.value, ast.Name) and ref.value.id in aliases:
            mod = aliases[ref.value.id][0]
            sub = f"{mod}.{aliases[ref.value.id][1]}" if aliases[ref.value.id][1] else mod
            if _file(sub) and sub.startswith("cli"):
                out |= _command_imports(sub, ref.attr, seen)
    return out


def _closure(runs: set[str], imported: set[str]) -> set[str]:
    """Every repository module reached: from `runs` (code that may run: all imports, function
    bodies included) and from `imported` (top-level imports only); packages' __init__ too."""
    todo = [(m, True) for m in runs] + [(m, False) for m in imported]
    done: set = set()
    while todo:
        m, full = todo.pop()
        if (m, full) in done or not _file(m):
            continue
        done.add((m, full))
        parts = m.split(".")
        todo += [(".".join(parts[:i]), False) for i in range(1, len(parts))]
        if full and m.startswith("pipeline"):
            ran: list = []
            named: list = []
            todo += [(i, True) for i in sorted(_imports_in(m, ast.walk(_tree(m)), ran, named))]
            todo += [(r, True) for r in ran] + [(r, False) for r in named if m not in NAMES_ONLY]
        else:
            todo += [(i, False) for i in sorted(_top_level_imports(m))]
    return {m for m, _ in done}


def _command(cmd: str) -> tuple[str, str]:
    """`clean sweep run --out x` → (cli module, function) of the command."""
    words = [w for w in shlex.split(cmd)[1:] if not w.startswith("-")]
    main = "cli.main"
    if words[0] == "sweep":
        return main, f"sweep_{words[1]}"
    if words[0] in _functions(main):
        return main, words[0]
    mod, name = _aliases(main)[words[0]]
    return mod, name


def stage_modules(stage: str) -> set[str]:
    """The pipeline/ source files (relative paths) the stage's command imports."""
    module, fn = _command(STAGES[stage]["cmd"])
    mods = _closure(_command_imports(module, fn), set())
    files = {_file(m).relative_to(ROOT).as_posix() for m in mods if m.startswith("pipeline")}
    return {f for f in files if not (f.endswith("__init__.py") and _is_docstring_only(f))}


def _is_docstring_only(path: str) -> bool:
    body = ast.parse((ROOT / path).read_text()).body
    return all(isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant) for n in body)


def _covered(path: str, deps: list) -> bool:
    names = [d if isinstance(d, str) else next(iter(d)) for d in deps]
    return any(path == d or path.startswith(d.rstrip("/") + "/") for d in names)


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_stage_deps_list_every_pipeline_module_its_command_imports(stage):
    mods = stage_modules(stage)
    assert mods, f"{stage}: no pipeline module found for `{STAGES[stage]['cmd']}`"
    missing = sorted(m for m in mods if not _covered(m, STAGES[stage].get("deps", [])))
    assert not missing, f"dvc.yaml stage {stage!r} runs {missing} but does not list them as deps"


def test_the_closure_sees_function_body_imports_and_registries():
    """The analysis itself: prune runs relabel.py (a registry module), checks.py (a strategies
    import) and score.py runs scores/influence.py (imported inside a function)."""
    prune, score = stage_modules("prune"), stage_modules("score")
    assert {"pipeline/relabel.py", "pipeline/checks.py", "pipeline/registry.py"} <= prune
    assert "pipeline/scores/influence.py" in score and "pipeline/scores/tracin.py" in score
    assert not any(m.startswith("pipeline/rules/") for m in stage_modules("prepare"))
    assert importlib.util.find_spec("pipeline.relabel") is not None
