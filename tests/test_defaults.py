"""Defaults live once (pipeline/params.py) and every list of names lives in one registry:
params.yaml, the CLI, the library and the README all agree."""
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from pipeline.params import CHOICES, DEFAULTS, load_params, validate
from pipeline.registry import RULES, SCORES, SOURCES, STRATEGIES

from .helpers import cwd, make_imagefolder

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_params_yaml_is_exactly_the_defaults():
    assert load_params(ROOT / "params.yaml") == validate({}) == validate(DEFAULTS)


@pytest.mark.parametrize("key,registry", [("flag.method", RULES), ("prune.strategy", STRATEGIES),
                                          ("data.source", SOURCES), ("flag.score", SCORES), ("prune.by", SCORES)])
def test_allowed_values_come_from_the_registries(key, registry):
    assert CHOICES[key] == registry.names()
    with pytest.raises(Exception, match="use one of: " + ", ".join(registry.names())):
        validate({key.split(".")[0]: {key.split(".")[1]: "no-such-name"}})


@pytest.mark.parametrize("command,registry", [("flag", RULES), ("prune", STRATEGIES), ("prepare", SOURCES)])
def test_cli_help_lists_every_registered_name(command, registry):
    res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "400"})
    assert res.exit_code == 0
    text = " ".join(res.output.split())
    assert " | ".join(registry.names()) in text


REFERENCE = ROOT / "docs" / "reference.md"  # the README is the quickstart; the registry tables live here


def test_readme_registry_tables_are_generated_from_the_registries():
    from pipeline.registry import TABLES, rewrite_readme

    readme = REFERENCE.read_text()
    for name in TABLES:
        assert f"<!-- registry:{name} -->" in readme or name == "SOURCES", name
    assert rewrite_readme(readme) == readme, "docs/reference.md tables are stale: run `python -m pipeline.registry docs/reference.md`"


def test_readme_documents_every_registered_name():
    readme = REFERENCE.read_text()
    for registry in (SCORES, RULES, STRATEGIES, SOURCES):
        for name in registry:
            assert f"`{name}`" in readme, f"docs/reference.md does not document {registry.concept} `{name}`"
    for entry in SCORES.entries() + RULES.entries() + STRATEGIES.entries() + SOURCES.entries():
        assert entry.doc, f"{entry.name} has no one-line doc"


def test_library_with_default_params_equals_the_cli(tmp_path):
    """`clean flag` / `clean prune` with params.yaml's defaults write the same files as the
    library stage functions called with no settings at all."""
    from pipeline.stages.flag import flag
    from pipeline.stages.prune import prune

    make_imagefolder(tmp_path / "data/imgs", n_per_class=12)
    (tmp_path / "params.yaml").write_text("data: {source: imagefolder, root: data/imgs}\n"
                                          "train: {epochs: 2, device: cpu, seeds: [0]}\n"
                                          "score: {params: last, self_influence: false}\n")
    with cwd(tmp_path):
        for cmd in (["prepare"], ["train"], ["score"], ["flag"], ["prune"]):
            res = runner.invoke(app, cmd)
            assert res.exit_code == 0, res.output
        lib = tmp_path / "lib"
        s = flag("scores/scores.csv", lib, manifest="data/manifest.csv", model_dir="models/base")
        prune("data/manifest.csv", "scores/scores.csv", "data/pruned_lib.csv", lib / "summary.json",
              flags_csv=lib / "flags.csv")
    assert s["method"] == DEFAULTS["flag"]["method"]
    assert (lib / "flags.csv").read_bytes() == (tmp_path / "scores/flags.csv").read_bytes()
    assert (tmp_path / "data/pruned_lib.csv").read_bytes() == (tmp_path / "data/pruned.csv").read_bytes()
