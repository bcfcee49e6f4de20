"""`clean`: find the training images your classifier does not need, drop them, retrain.

Thin Typer layer: parse options, read params.yaml, call pipeline/, print with rich.
torch/timm are imported only inside commands, so `clean --help` is instant.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .ui import RichProgress, console, handle_errors, table

app = typer.Typer(
    name="clean",
    help="Find the training images that hurt your classifier, drop them, retrain, and track "
         "every dataset version with DVC. Every command reads params.yaml; options override it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PARAMS = typer.Option(Path("params.yaml"), "--params", help="params.yaml to read (defaults are used for missing keys).")


def _params(path: Path, **overrides):
    from pipeline.params import load_params, override

    return override(load_params(path), **overrides)


def _stage_progress():
    """progress(stage, done, total) callback printing one line per stage (prepare's protocol)."""
    seen = set()

    def cb(stage: str, done: int, total: int) -> None:
        if stage not in seen:
            seen.add(stage)
            console.print(f"[dim]{stage}: {total} item(s)[/]", highlight=False)

    return cb


@app.command()
@handle_errors
def prepare(
    source: Optional[str] = typer.Option(None, help="digits | fashion-mnist | imagefolder | csv (params: data.source)"),
    root: Optional[str] = typer.Option(None, help="image folder, CSV file, or IDX folder (params: data.root)"),
    out: Path = typer.Option(Path("data"), help="folder for manifest.csv, classes.json, problems.csv"),
    val_frac: Optional[float] = typer.Option(None, help="validation fraction of the training part (params: data.val_frac)"),
    test_frac: Optional[float] = typer.Option(None, help="test fraction when the source has no test split (params: data.test_frac)"),
    seed: Optional[int] = typer.Option(None, help="split seed (params: data.seed)"),
    noise_rate: Optional[float] = typer.Option(None, help="fraction of training labels to corrupt (params: noise.rate)"),
    noise_kind: Optional[str] = typer.Option(None, help="symmetric | pairs (params: noise.kind)"),
    params: Path = PARAMS,
):
    """Read a source into data/manifest.csv (id,path,label,split), classes.json and problems.csv."""
    from pipeline.prepare import prepare as run

    p = _params(params, data__source=source, data__root=root, data__val_frac=val_frac,
                data__test_frac=test_frac, data__seed=seed, noise__rate=noise_rate, noise__kind=noise_kind)
    d, nz = p["data"], p["noise"]
    s = run(d["source"], d["root"], out, val_frac=d["val_frac"], test_frac=d["test_frac"], seed=d["seed"],
            classes=d["classes"], noise_rate=nz["rate"], noise_kind=nz["kind"], noise_pairs=nz["pairs"],
            noise_seed=nz["seed"], progress=_stage_progress())
    rows = [(k, v) for k, v in s.get("counts", {}).items()]
    console.print(table(f"prepared {s.get('source')} → {out}/manifest.csv", ["split", "images"], rows))
    if s.get("n_noisy"):
        console.print(f"injected label noise: {s['n_noisy']} training labels changed ({nz['kind']}, rate {nz['rate']})")
    for w in s.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    n_prob = s.get("n_problems", 0)
    style = "yellow" if n_prob else "green"
    console.print(f"[{style}]{n_prob} problem file(s)[/] listed in {out}/problems.csv", highlight=False)


@app.command()
@handle_errors
def train(
    manifest: Path = typer.Option(Path("data/manifest.csv"), help="manifest to train on (its train split)"),
    out: Path = typer.Option(Path("models/base"), help="model folder to write"),
    model: Optional[str] = typer.Option(None, help="timm model name or small_cnn / small_cnn_bn (params: model.name)"),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--no-pretrained", help="start from timm weights (params: model.pretrained)"),
    epochs: Optional[int] = typer.Option(None, help="epochs (params: train.epochs)"),
    batch_size: Optional[int] = typer.Option(None, help="batch size (params: train.batch_size)"),
    optimizer: Optional[str] = typer.Option(None, help="sgd | adam | adamw (params: train.optimizer)"),
    lr: Optional[float] = typer.Option(None, help="learning rate (params: train.lr)"),
    weight_decay: Optional[float] = typer.Option(None, help="weight decay (params: train.weight_decay)"),
    schedule: Optional[str] = typer.Option(None, help="constant | cosine | step (params: train.schedule)"),
    seed: Optional[int] = typer.Option(None, help="seed for init, shuffling, dropout (params: train.seed)"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda (params: train.device)"),
    params: Path = PARAMS,
):
    """Train a model from scratch on a manifest's train split; writes weights, config, dynamics, checkpoints."""
    from pipeline.train import Recipe, train as run

    p = _params(params, model__name=model, model__pretrained=pretrained, train__epochs=epochs,
                train__batch_size=batch_size, train__optimizer=optimizer, train__lr=lr,
                train__weight_decay=weight_decay, train__schedule=schedule, train__seed=seed,
                train__device=device)
    recipe = Recipe.from_params(p)
    with RichProgress() as prog:
        m = run(manifest, out, recipe, progress=prog)
    rows = [(k, m[k]) for k in ("n_train", "epochs", "train_loss", "train_accuracy", "val_loss",
                                "val_accuracy", "seconds", "samples_per_s") if k in m]
    console.print(table(f"trained {recipe.model} → {out}", ["metric", "value"], rows))


@app.command()
@handle_errors
def evaluate(
    model: Path = typer.Option(Path("models/base"), help="trained model folder"),
    manifest: Path = typer.Option(Path("data/manifest.csv"), help="manifest holding the test split"),
    name: str = typer.Option("base", help="version name: writes metrics/<name>.json, plots/confusion_<name>.csv"),
    split: str = typer.Option("test", help="split to evaluate on"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda (params: train.device)"),
    params: Path = PARAMS,
):
    """Evaluate a model on the untouched test split → metrics/<name>.json for `dvc metrics diff`."""
    from pipeline.evaluate import evaluate as run

    p = _params(params, train__device=device)
    with RichProgress() as prog:
        m = run(model, manifest, name, split=split, device=p["train"]["device"], progress=prog)
    rows = [("accuracy", m["accuracy"]), ("loss", m["loss"]), ("n", m["n"])]
    rows += [(f"accuracy[{k}]", v) for k, v in m["per_class_accuracy"].items()]
    console.print(table(f"{name}: {model} on {split}", ["metric", "value"], rows))


if __name__ == "__main__":
    app()
