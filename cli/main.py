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


@app.command()
@handle_errors
def score(
    path: Path = typer.Argument(Path("data/manifest.csv"), help="a manifest, an image folder (root/<class>/<image>) or a CSV of path,label"),
    model: str = typer.Option("models/base", help="trained model folder, or a model name to train first on PATH (e.g. resnet18)"),
    out: Path = typer.Option(Path("scores"), help="folder for scores.csv and meta.json"),
    norm: Optional[str] = typer.Option(None, help="l1 | l2 | linf (params: score.norm)"),
    subset: Optional[str] = typer.Option(None, help="gradient w.r.t.: last | weights | biases | all (params: score.params)"),
    batch_size: Optional[int] = typer.Option(None, help="scoring batch size (params: score.batch_size)"),
    split: Optional[str] = typer.Option(None, help="train | val | test | all (params: score.split)"),
    self_influence: Optional[bool] = typer.Option(None, "--self-influence/--no-self-influence", help="TracIn over checkpoints (params: score.self_influence)"),
    epochs: Optional[int] = typer.Option(None, help="epochs when --model is a name to train (params: train.epochs)"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda (params: train.device)"),
    top: int = typer.Option(10, help="rows in the top-scoring table"),
    params: Path = PARAMS,
):
    """Score every training image: loss, gradient norm, EL2N, margin, AUM, forgetting, data-map
    confidence/variability, self-influence → scores/scores.csv."""
    from pipeline.scores import score as run
    from pipeline.standalone import as_manifest

    p = _params(params, score__norm=norm, score__params=subset, score__batch_size=batch_size,
                score__split=split, score__self_influence=self_influence, train__epochs=epochs,
                train__device=device)
    sc = p["score"]
    model_dir = Path(model)
    if not (model_dir / "config.json").exists():
        if model_dir.exists() or "/" in model:
            raise CleanError(f"{model_dir}/config.json not found; train a model first (clean train --out {model_dir}) "
                             "or pass a model name such as resnet18 to train one on PATH")
        manifest, summary = as_manifest(path, out / "input")
        _report_input(summary, out / "input")
        from pipeline.train import Recipe, train as run_train

        recipe = Recipe.from_params(p)
        recipe.model = model
        model_dir = Path("models") / model
        console.print(f"training {model} on {manifest} for {recipe.epochs} epoch(s) → {model_dir}")
        with RichProgress() as prog:
            run_train(manifest, model_dir, recipe, progress=prog)
    else:
        import json

        classes = json.loads((model_dir / "config.json").read_text()).get("classes")
        manifest, summary = as_manifest(path, out / "input", classes)
        _report_input(summary, out / "input")
    with RichProgress() as prog:
        df = run(model_dir, manifest, out, norm=sc["norm"], params=sc["params"], batch_size=sc["batch_size"],
                 device=p["train"]["device"], split=sc["split"] if manifest == path else "train",
                 with_self_influence=sc["self_influence"], progress=prog)
    _score_tables(df, model_dir, sc, top)
    console.print(f"wrote {out}/scores.csv ({len(df)} rows) and {out}/meta.json")


def _report_input(summary: dict, where: Path) -> None:
    if summary:
        n = summary.get("n_problems", 0)
        console.print(f"read {summary.get('num_samples')} image(s) from the input; "
                      f"{n} problem(s) listed in {where}/problems.csv", highlight=False)


def _score_tables(df, model_dir: Path, sc: dict, top: int) -> None:
    import json

    classes = json.loads((model_dir / "config.json").read_text())["classes"]
    name = lambda i: classes[int(i)] if 0 <= int(i) < len(classes) else str(i)  # noqa: E731
    by = "grad_norm"
    head = df.sort_values([by, "id"], ascending=[False, True]).head(top)
    console.print(table(f"top {top} by {by} ({sc['norm']}, {sc['params']})",
                        ["id", "label", "pred", "loss", "grad_norm", "aum", "path"],
                        [(r.id, name(r.label), name(r.pred), r.loss, r.grad_norm, r.aum, r.path)
                         for r in head.itertuples()]))
    from pipeline.scores import SCORE_COLUMNS

    cols = [c for c in SCORE_COLUMNS if df[c].notna().any()]
    qs = df[cols].quantile([0.0, 0.25, 0.5, 0.75, 0.95, 1.0])
    console.print(table("score quantiles", ["score", "min", "q25", "median", "q75", "q95", "max"],
                        [(c, *[float(qs.loc[q, c]) for q in qs.index]) for c in cols]))
    means = df.groupby("label")[["loss", "grad_norm", "margin", "aum"]].mean()
    counts = df.groupby("label").size()
    console.print(table("per-class means", ["class", "n", "loss", "grad_norm", "margin", "aum"],
                        [(name(c), int(counts[c]), *[float(v) for v in means.loc[c]]) for c in means.index]))


if __name__ == "__main__":
    app()
