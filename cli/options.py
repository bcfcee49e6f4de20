"""Options shared by several commands: the DVC pipeline's default paths, written once.

Only cli/ knows these locations (data/, models/, scores/, metrics/, plots/); pipeline/ takes
every path as an argument.
"""
from __future__ import annotations

from pathlib import Path

import typer

MANIFEST = Path("data/manifest.csv")
SCORES = Path("scores/scores.csv")
FLAGS = Path("scores/flags.csv")
BASE_MODEL = Path("models/base")
METRICS = Path("metrics")
PLOTS = Path("plots")

PARAMS = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read (defaults are used for missing keys).")


def manifest(help: str = "the dataset manifest (from `clean prepare`)"):
    return typer.Option(MANIFEST, help=help)


def scores(help: str = "scores from `clean score`"):
    return typer.Option(SCORES, help=help)


def flags(help: str = "flags from `clean flag`"):
    return typer.Option(FLAGS, help=help)


def model(help: str = "trained model folder"):
    return typer.Option(BASE_MODEL, help=help)


def guard(command: str, inputs, outputs, manifest=None, params=None) -> None:
    """The one output check of every command that writes (pipeline/paths.py check_io): no output
    is, or lies inside, an input, a folder of the images any input table lists, or the project's
    source-image tree (data.root of `params`, default params.yaml, and the folders of the images
    in data/manifest.csv). inputs/outputs: (label, path) pairs; `manifest`: the command's manifest."""
    from pipeline.paths import check_io, project_sources

    extra = [("--manifest", manifest)] if manifest is not None else []
    check_io(command, [*inputs, *extra, *project_sources(params or PARAMS.default, MANIFEST)], outputs)
