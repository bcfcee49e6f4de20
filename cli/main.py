"""`clean`: find the training images your classifier does not need, drop them, retrain.

Thin Typer layer: parse options, read params.yaml, call pipeline/, print with rich.
torch/timm are imported only inside commands, so `clean --help` is instant.
"""
from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from . import options as opt
from .ui import RichProgress, console, handle_errors, table

app = typer.Typer(
    name="clean",
    help="Find the training images that hurt your classifier, drop them, retrain, and track "
         "every dataset version with DVC. Every command reads params.yaml; options override it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

PARAMS = opt.PARAMS


def _one_of(key: str, prefix: str = "", key_note: bool = True) -> str:
    """Option help 'a | b | c (params: key)' from params.py's CHOICES (which read the registries)."""
    from pipeline.params import CHOICES

    return prefix + " | ".join(CHOICES[key]) + (f" (params: {key})" if key_note else "")


def _config(path: Path, **overrides):
    """params.yaml (validated) + the command's options (`section__key`, None = keep) → every
    stage's typed config (pipeline/config.py: c.prepare, c.train, c.score, c.flag, c.prune, ...)."""
    from pipeline.config import load_config

    return load_config(path, **overrides)


_io = opt.guard  # the one output check (cli/options.py)


def _classes(manifest: Path) -> tuple[str, Path]:
    from pipeline.formats.manifest import classes_path_for

    return ("the classes.json of --manifest", classes_path_for(manifest))


def _attribution(scores: Path) -> tuple[str, Path]:
    """The removal effects `clean score` writes beside scores.csv, read by `harmful` and the gated prune."""
    return ("the attribution.npz beside --scores", scores.parent / "attribution.npz")


def _check_out_dir(out: Path) -> None:
    """A model folder option must not name an existing file, nor be a symbolic link (pipeline/ownership.py)."""
    from pipeline.errors import CleanError
    from pipeline.ownership import not_a_link

    not_a_link(out)
    if out.exists() and not out.is_dir():
        raise CleanError(f"--out {out} is a file; give a folder for the model (e.g. models/base)")


@app.command()
@handle_errors
def prepare(
    source: Optional[str] = typer.Option(None, help=_one_of("data.source")),
    root: Optional[str] = typer.Option(None, help="image folder, CSV file, or IDX folder (params: data.root)"),
    out: Path = typer.Option(Path("data"), help="folder for manifest.csv, classes.json, problems.csv"),
    val_frac: Optional[float] = typer.Option(None, help="validation fraction of the training part (params: data.val_frac)"),
    test_frac: Optional[float] = typer.Option(None, help="test fraction when the source has no test split (params: data.test_frac)"),
    seed: Optional[int] = typer.Option(None, help="split seed (params: data.seed)"),
    noise_rate: Optional[float] = typer.Option(None, help="fraction of training labels to corrupt (params: noise.rate)"),
    noise_kind: Optional[str] = typer.Option(None, help=_one_of("noise.kind")),
    params: Path = PARAMS,
):
    """Read a source into data/manifest.csv (id,path,label,split), classes.json and problems.csv."""
    from pipeline.stages.prepare import prepare as run

    c = _config(params, data__source=source, data__root=root, data__val_frac=val_frac,
                data__test_frac=test_frac, data__seed=seed, noise__rate=noise_rate, noise__kind=noise_kind)
    pc = c.prepare
    _io("prepare", [("data.root", pc.root)],
        [("--out", out)] + [("--out", out / f) for f in ("manifest.csv", "classes.json", "problems.csv")], params=params)
    with RichProgress() as prog:
        s = run(out, pc, progress=prog)
    rows = [(k, v) for k, v in s.get("counts", {}).items()]
    console.print(table(f"prepared {s.get('source')} → {out}/manifest.csv", ["split", "images"], rows))
    if s.get("n_noisy"):
        console.print(f"injected label noise: {s['n_noisy']} labels changed in {', '.join(pc.noise_splits)} "
                      f"({pc.noise_kind}, rate {pc.noise_rate})")
    for w in s.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    n_prob = s.get("n_problems", 0)
    style = "yellow" if n_prob else "green"
    console.print(f"[{style}]{n_prob} problem file(s)[/] listed in {out}/problems.csv", highlight=False)


@app.command()
@handle_errors
def train(
    manifest: Path = opt.manifest("manifest to train on (its train split)"),
    out: Path = typer.Option(Path("models/base"), help="model folder to write"),
    model: Optional[str] = typer.Option(None, help="timm model name or small_cnn / small_cnn_bn (params: model.name)"),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained/--no-pretrained", help="start from timm weights (params: model.pretrained)"),
    weights: Optional[str] = typer.Option(None, help="local pretrained checkpoint, .safetensors or a .pth/.bin state dict (params: model.weights)"),
    augment: Optional[str] = typer.Option(None, help="training-batch crop + flip: auto | none | flip-crop (params: train.augment)"),
    epochs: Optional[int] = typer.Option(None, help="epochs (params: train.epochs)"),
    batch_size: Optional[int] = typer.Option(None, help="batch size (params: train.batch_size)"),
    optimizer: Optional[str] = typer.Option(None, help=_one_of("train.optimizer")),
    lr: Optional[float] = typer.Option(None, help="learning rate (params: train.lr)"),
    weight_decay: Optional[float] = typer.Option(None, help="weight decay (params: train.weight_decay)"),
    schedule: Optional[str] = typer.Option(None, help=_one_of("train.schedule")),
    seed: Optional[List[int]] = typer.Option(None, help="seed for init, shuffling, dropout; repeat for several runs (params: train.seeds)"),
    device: Optional[str] = typer.Option(None, help=_one_of("train.device")),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted run from its newest epoch state (OUT/.partial/); same settings required"),
    amp: Optional[str] = typer.Option(None, help="mixed precision: auto | off | bf16 | fp16 (params: train.amp)"),
    workers: Optional[int] = typer.Option(None, help="processes decoding streamed images (params: train.workers)"),
    cache_max_gb: Optional[float] = typer.Option(None, help="decoded images beyond this many GiB are streamed from disk (params: data.cache_max_gb)"),
    params: Path = PARAMS,
):
    """Train a model from scratch on a manifest's train split; writes weights, config, dynamics, checkpoints.

    Runs data-parallel under torchrun: torchrun --standalone --nproc-per-node N --no-python clean train ..."""
    from pipeline.distributed import is_main
    from pipeline.stages.train import train as run

    c = _config(params, model__name=model, model__pretrained=pretrained, model__weights=weights,
                train__augment=augment, train__epochs=epochs,
                train__batch_size=batch_size, train__optimizer=optimizer, train__lr=lr,
                train__weight_decay=weight_decay, train__schedule=schedule, train__seeds=list(seed) if seed else None,
                train__device=device, train__amp=amp, train__workers=workers, data__cache_max_gb=cache_max_gb)
    recipe = c.train
    _check_out_dir(out)
    _io("train", [("--manifest", manifest), _classes(manifest)], [("--out", out)], manifest, params)
    try:
        with _progress() as prog:
            m = run(manifest, out, recipe, seeds=c.seeds, progress=prog, resume=resume)
    except KeyboardInterrupt:
        if is_main():
            console.print(f"[yellow]interrupted[/]: run the same command with --resume to continue "
                          f"from the last saved epoch ({out}/.partial/)", highlight=False)
        raise
    if not is_main():
        return
    rows = [(k, m[k]) for k in ("n_train", "epochs", "train_loss", "train_accuracy", "val_loss",
                                "val_accuracy", "seconds", "samples_per_s") if k in m]
    console.print(table(f"trained {recipe.model} → {out}", ["metric", "value"], rows))


def _progress():
    """Rich progress bars on rank 0; nothing on the other ranks of a torchrun job."""
    import contextlib

    from pipeline.distributed import is_main

    return RichProgress() if is_main() else contextlib.nullcontext()


def _versioned_outputs(command: str, name: str, inputs, manifest: Path, params: Path) -> None:
    """--name is a plain name; metrics/<name>.json and plots/confusion_<name>.csv are no input."""
    from pipeline.paths import check_name

    check_name("--name", name, "metrics/<name>.json and plots/confusion_<name>.csv")
    _io(command, inputs, [("--name", opt.METRICS / f"{name}.json"), ("--name", opt.PLOTS / f"confusion_{name}.csv"),
                          ("--name", opt.PLOTS / f"evaluate_{name}.json")], manifest, params)


FLAGS_ASIDE = typer.Option(None, help="flags.csv: its flagged test images are left out of accuracy_unflagged")
DECISIONS_ASIDE = typer.Option(None, help="decisions.csv: reviewed test labels → accuracy_reviewed")


def _pm(m: dict, key: str = "accuracy") -> str:
    """accuracy (or `key`) as 'mean ± std (n seeds)'."""
    if m.get("n_seeds", 1) > 1:
        return f"{m[key]:.4f} ± {m[key + '_std']:.4f} ({m['n_seeds']} seeds)"
    return f"{m[key]:.4f}"


def _aside_rows(m: dict) -> list:
    """The accuracy with the test split's label decisions applied, when evaluate computed it."""
    from pipeline.stages.evaluate import ASIDE_KEYS

    said = {"accuracy_reviewed": "accuracy (reviewed test labels; {n} set aside{leak})",
            "accuracy_unflagged": "accuracy (flagged test images left out: {n}{leak})"}
    leak = f", {m['n_leaked']} leaked copies of training images" if m.get("n_leaked") else ""
    return [(said[k].format(n=m["n_set_aside"], leak=leak), _pm(m, k)) for k in ASIDE_KEYS if k in said and k in m]


@app.command()
@handle_errors
def evaluate(
    model: Path = opt.model("trained model folder"),
    manifest: Path = opt.manifest("manifest holding the test split"),
    name: str = typer.Option("base", help="version name: writes metrics/<name>.json, plots/confusion_<name>.csv"),
    split: str = typer.Option("test", help="split to evaluate on"),
    baseline: Optional[str] = typer.Option(None, help="another version (e.g. base): the verdict against it over the seeds"),
    device: Optional[str] = typer.Option(None, help=_one_of("train.device")),
    flags: Optional[Path] = FLAGS_ASIDE,
    decisions: Optional[Path] = DECISIONS_ASIDE,
    params: Path = PARAMS,
):
    """Evaluate a model on the untouched test split → metrics/<name>.json for `dvc metrics diff`;
    with --flags / --decisions also the accuracy with the test split's label decisions applied."""
    from pipeline.stages.evaluate import evaluate as run

    c = _config(params, train__device=device)
    _versioned_outputs("evaluate", name, [("--model", model), ("--manifest", manifest)], manifest, params)
    with RichProgress() as prog:
        m = run(model, manifest, name, opt.METRICS, opt.PLOTS, split=split, device=c.train.device,
                progress=prog, baseline=baseline, flags_csv=flags, decisions=decisions)
    rows = [("accuracy", _pm(m)), *_aside_rows(m), ("loss", m["loss"]), ("n", m["n"]), ("seeds", m["n_seeds"])]
    rows += [(f"accuracy[{k}]", v) for k, v in m["per_class_accuracy"].items()]
    console.print(table(f"{name}: {model} on {split}", ["metric", "value"], rows))
    _verdict(name, m)


def _verdict(name: str, m: dict) -> None:
    if "verdict" in m:
        from pipeline.verdict import sentence

        style = {"better": "green", "worse": "red"}.get(m["verdict"], "yellow")
        console.print(f"[{style}]{sentence(name, m['baseline'], m)}[/]", highlight=False)


@app.command()
@handle_errors
def score(
    path: Path = typer.Argument(Path("data/manifest.csv"), help="a manifest, an image folder (root/<class>/<image>) or a CSV of path,label"),
    model: str = typer.Option("models/base", help="trained model folder, or a model name to train first on PATH (e.g. resnet18)"),
    out: Path = typer.Option(Path("scores"), help="folder for scores.csv and meta.json"),
    norm: Optional[str] = typer.Option(None, help=_one_of("score.norm")),
    subset: Optional[str] = typer.Option(None, help=_one_of("score.params", "gradient w.r.t.: ")),
    batch_size: Optional[int] = typer.Option(None, help="scoring batch size (params: score.batch_size)"),
    split: Optional[str] = typer.Option(None, help=_one_of("score.split")),
    self_influence: Optional[bool] = typer.Option(None, "--self-influence/--no-self-influence", help="TracIn over checkpoints (params: score.self_influence)"),
    val_influence: Optional[bool] = typer.Option(None, "--val-influence/--no-val-influence", help="TracIn train→validation over checkpoints (params: score.val_influence)"),
    embeddings: Optional[bool] = typer.Option(None, "--embeddings/--no-embeddings", help="embeddings.npz for duplicates / outliers / image checks (params: score.embeddings)"),
    seed_embeddings: Optional[bool] = typer.Option(None, "--seed-embeddings/--no-seed-embeddings", help="embeddings.npz also holds the other seed models' embeddings; the outlier check averages over them (params: score.seed_embeddings)"),
    importance: Optional[bool] = typer.Option(None, "--importance/--no-importance", help="predicted effect of removing each image on the mean val loss, TRAK over the seeds (params: score.importance)"),
    epochs: Optional[int] = typer.Option(None, help="epochs when --model is a name to train (params: train.epochs)"),
    device: Optional[str] = typer.Option(None, help=_one_of("train.device")),
    workers: Optional[int] = typer.Option(None, help="processes decoding streamed images (params: train.workers)"),
    cache_max_gb: Optional[float] = typer.Option(None, help="decoded images beyond this many GiB are streamed from disk (params: data.cache_max_gb)"),
    top: int = typer.Option(10, help="rows in the top-scoring table"),
    params: Path = PARAMS,
):
    """Score every training image (loss, gradient norm, AUM, forgetting, self-influence, ...) → scores/scores.csv.

    One column per registered score (docs/methods.md §1); `clean score --help` lists the options.
    Runs sharded under torchrun: torchrun --standalone --nproc-per-node N --no-python clean score ..."""
    from pipeline.distributed import is_main
    from pipeline.stages.score import score_input

    c = _config(params, score__norm=norm, score__params=subset, score__batch_size=batch_size,
                score__split=split, score__self_influence=self_influence, score__val_influence=val_influence,
                score__embeddings=embeddings, score__seed_embeddings=seed_embeddings, score__importance=importance, train__epochs=epochs,
                train__device=device, train__workers=workers, data__cache_max_gb=cache_max_gb)
    _score_io(path, Path(model), out, params)
    with _progress() as prog:
        df, model_dir = score_input(path, model, out, c, progress=prog,
                                    on_input=_report_input if is_main() else None)
    if df is None:  # another rank of a torchrun job: rank 0 wrote the files
        return
    _score_tables(df, model_dir, c.score, top)
    console.print(f"wrote {out}/scores.csv ({len(df)} rows) and {out}/meta.json")


def _score_io(path: Path, model: Path, out: Path, params: Path) -> None:
    from pipeline.stages.standalone import is_manifest

    inputs = [("PATH", path)] + ([("--model", model)] if model.is_dir() else [])
    manifest = path if is_manifest(path) else None
    outputs = [("--out", out)] + [("--out", out / f) for f in ("scores.csv", "meta.json", "embeddings.npz",
                                                                 "attribution.npz")]
    _io("score", inputs + ([_classes(path)] if manifest else []), outputs + ([] if manifest else [("--out", out / "input")]),
        manifest, params)


def _report_input(summary: dict, where: Path) -> None:
    if summary:
        n = summary.get("n_problems", 0)
        console.print(f"read {summary.get('num_samples')} image(s) from the input; "
                      f"{n} problem(s) listed in {where}/problems.csv", highlight=False)


def _score_tables(df, model_dir: Path, sc, top: int) -> None:
    import json

    classes = json.loads((model_dir / "config.json").read_text())["classes"]
    name = lambda i: classes[int(i)] if 0 <= int(i) < len(classes) else str(i)  # noqa: E731
    by = "grad_norm"
    head = df.sort_values([by, "id"], ascending=[False, True]).head(top)
    console.print(table(f"top {top} by {by} ({sc.norm}, {sc.subset})",
                        ["id", "label", "pred", "loss", "grad_norm", "aum", "path"],
                        [(r.id, name(r.label), name(r.pred), r.loss, r.grad_norm, r.aum, r.path)
                         for r in head.itertuples()]))
    from pipeline.registry import SCORES

    cols = [c for c in SCORES.names() if df[c].notna().any()]
    qs = df[cols].quantile([0.0, 0.25, 0.5, 0.75, 0.95, 1.0])
    console.print(table("score quantiles", ["score", "min", "q25", "median", "q75", "q95", "max"],
                        [(c, *[float(qs.loc[q, c]) for q in qs.index]) for c in cols]))
    means = df.groupby("label")[["loss", "grad_norm", "margin", "aum"]].mean()
    counts = df.groupby("label").size()
    console.print(table("per-class means", ["class", "n", "loss", "grad_norm", "margin", "aum"],
                        [(name(c), int(counts[c]), *[float(v) for v in means.loc[c]]) for c in means.index]))


@app.command()
@handle_errors
def flag(
    scores: Path = opt.scores("scores from `clean score`"),
    out: Path = typer.Option(Path("scores"), help="folder for flags.csv"),
    method: Optional[str] = typer.Option(None, help=_one_of("flag.method")),
    score: Optional[str] = typer.Option(None, help="score column for quantile/mad/gmm (params: flag.score)"),
    quantile: Optional[float] = typer.Option(None, help="flag the top q (params: flag.quantile)"),
    threshold: Optional[float] = typer.Option(None, help="robust z threshold (params: flag.threshold)"),
    contamination: Optional[float] = typer.Option(None, help="isolation-forest contamination (params: flag.contamination)"),
    folds: Optional[int] = typer.Option(None, help="confident: k-fold cross-fitting (params: flag.folds)"),
    model: Path = opt.model("model for isolation-forest gradient vectors"),
    manifest: Path = opt.manifest("manifest the scores came from"),
    metrics: Optional[Path] = typer.Option(Path("metrics/flags.json"), help="flag summary JSON (precision/recall/AUROC when the truth is known)"),
    params: Path = PARAMS,
):
    """Find the training images with a problem → scores/flags.csv, scores/issues.json, metrics/flags.json.

    Every issue type (label errors, duplicates and train/test leakage, outliers, image defects)
    gets is_<type> / <type>_score columns; flagged,rule,value are the label rule (flag.method)."""
    from pipeline.stages.flag import flag as run

    c = _config(params, flag__method=method, flag__score=score, flag__quantile=quantile,
                flag__threshold=threshold, flag__contamination=contamination, flag__folds=folds)
    f = c.flag
    _io("flag", [("--scores", scores), ("--manifest", manifest), _classes(manifest), ("--model", model),
                 ("the embeddings of --scores", scores.parent / "embeddings.npz"), _attribution(scores)],
        [("--out", out / n) for n in ("flags.csv", "issues.json", "top_flagged.png")] + [("--metrics", metrics)], manifest, params)
    with RichProgress() as prog:
        s = run(scores, out, f, model_dir=model, manifest=manifest, recipe=c.train, progress=prog, metrics_path=metrics)
    if f.grid:
        console.print(f"grid of the top flagged images → {out}/top_flagged.png")
    rows = [("rule", s["rule"]), ("flagged", f"{s['n_flagged']} of {s['n']} ({s['n_flagged'] / max(s['n'], 1):.1%})")]
    for k in ("n_noisy", "precision", "recall", "auroc"):
        if k in s:
            rows.append((f"{k} (vs injected noise)" if k != "n_noisy" else "injected noisy labels", s[k]))
    rows.append(("seconds", s["seconds"]))
    console.print(table(f"flag: {f.method} → {out}/flags.csv", ["", "value"], rows))
    _issue_table(out / "issues.json", s["n"])
    _flag_tables(scores, out / "flags.csv", manifest)


def _issue_table(issues_json: Path, n: int) -> None:
    import json

    from pipeline.views.why import examples_line, facts_line

    found = {t: d for t, d in json.loads(issues_json.read_text()).items() if "skipped" not in d}
    console.print(table("issues found", ["issue", "images", "%", "e.g. id", "details"],
                        [(t, d["n"], f"{d['n'] / max(n, 1):.1%}", examples_line(d["examples"]), facts_line(d))
                         for t, d in found.items()]))


def _flag_tables(scores: Path, flags: Path, manifest: Path, top: int = 10) -> None:
    from pipeline.formats.manifest import classes_path_for, read_classes
    from pipeline.formats.tables import join_flags, read_flags, read_scores

    classes = read_classes(classes_path_for(manifest))["classes"]
    df = join_flags(read_scores(scores, ["path", "pred"]), read_flags(flags), flags).rename(columns={"flag_value": "value"})
    per = df.groupby("label").agg(n=("id", "size"), flagged=("flagged", "sum"))
    console.print(table("flagged per class", ["class", "n", "flagged", "%"],
                        [(classes[c], int(r.n), int(r.flagged), f"{r.flagged / r.n:.1%}") for c, r in per.iterrows()]))
    topf = df[df["flagged"] == 1].sort_values(["value", "id"], ascending=[False, True]).head(top)
    if len(topf):
        console.print(table(f"top {len(topf)} flagged", ["id", "label", "pred", "value", "loss", "path"],
                            [(r.id, classes[r.label], classes[r.pred], r.value, r.loss, r.path) for r in topf.itertuples()]))


@app.command()
@handle_errors
def prune(
    manifest: Path = opt.manifest("manifest to select from"),
    scores: Path = opt.scores("scores from `clean score`"),
    flags: Path = opt.flags("flags from `clean flag` (drop-flagged)"),
    out: Path = typer.Option(Path("data/pruned.csv"), help="the new dataset version (a manifest)"),
    summary: Path = typer.Option(Path("prune/summary.json"), help="kept per class, label entropy"),
    strategy: Optional[str] = typer.Option(None, help=_one_of("prune.strategy")),
    by: Optional[str] = typer.Option(None, help="any score column: max-gradient / non-extreme keep its largest values, "
                                                "gradient-cdf samples ∝ it (params: prune.by)"),
    keep: Optional[float] = typer.Option(None, help="fraction of training samples to keep (params: prune.keep)"),
    skip: Optional[float] = typer.Option(None, help="non-extreme: top fraction skipped (params: prune.skip)"),
    balanced: Optional[bool] = typer.Option(None, "--balanced/--unbalanced", help="select per class (params: prune.balanced)"),
    seed: Optional[int] = typer.Option(None, help="seed for random / gradient-cdf (params: prune.seed)"),
    drop: Optional[List[str]] = typer.Option(None, help="drop-flagged: an issue type to drop; repeat for several (params: prune.drop)"),
    decisions: Path = typer.Option(Path("data/decisions.csv"), help="a person's decisions from `clean review`, applied on top of the strategy (used when the file exists)"),
    metrics: Optional[Path] = typer.Option(None, help="also write the predicted change of the mean val loss here as {\"dloss\": nats} (a DVC metric, e.g. metrics/pred.json)"),
    params: Path = PARAMS,
):
    """Select a subset of the training set → data/pruned.csv (ids + label overrides; images never copied or deleted)."""
    from pipeline.stages.prune import prune as run

    c = _config(params, prune__strategy=strategy, prune__by=by, prune__keep=keep, prune__skip=skip,
                prune__balanced=balanced, prune__seed=seed, prune__drop=list(drop) if drop else None)
    q = c.prune
    _io("prune", [("--manifest", manifest), ("--scores", scores), ("--flags", flags), ("--decisions", decisions),
                  _classes(manifest), _attribution(scores)], [("--out", out), ("--summary", summary)] + ([("--metrics", metrics)] if metrics else [])
        + _classes_beside(out, manifest), manifest, params)
    s = run(manifest, scores, out, summary, q, flags_csv=flags, decisions=decisions, metrics=metrics)
    ent = s["label_entropy"]
    console.print(table(f"prune: {q.strategy} → {out}", ["", "value"], [
        ("kept", f"{s['n_kept']} of {s['n_total']} ({s['n_kept'] / s['n_total']:.1%})"),
        ("label entropy kept / all / uniform", f"{ent['kept']:.4f} / {ent['all']:.4f} / {ent['uniform']:.4f} nats"),
        *[(k.replace("_", " "), s[k]) for k in ("noisy_removed", "noisy_kept", "clean_removed") if k in s],
        *([("label issues dropped / kept by the gate", f"{s['label_gate']['dropped']} / {s['label_gate']['kept']} "
            f"({s['label_gate']['rule']})")] if s.get("label_gate") else []),
        *([(f"review ({decisions})", f"{s['n_review_dropped']} dropped, {s['n_review_kept']} kept, "
            f"{s['n_relabeled']} relabeled; {s['n_review_overrode']} overrode the strategy")] if s.get("decisions") else []),
        *([("predicted change of the mean val loss", f"{s['effect']['predicted_dval_loss']:+.4f} ± "
            f"{s['effect']['predicted_dval_loss_sd']:.4f} nats")] if s.get("effect") else [])]))
    console.print(table("kept per class", ["class", "kept", "fraction"],
                        [(c, s["kept_per_class"][c], s["fraction_kept_per_class"][c]) for c in s["kept_per_class"]]))


def _classes_beside(out: Path, manifest: Path) -> list:
    """The classes.json a derived manifest gets beside it (unless it is the source's own)."""
    import os

    from pipeline.formats.manifest import classes_path_for

    mine, theirs = out.parent / "classes.json", classes_path_for(manifest)
    return [] if os.path.realpath(mine) == os.path.realpath(theirs) else [("--out (its classes.json)", mine)]


@app.command()
@handle_errors
def retrain(
    manifest: Path = typer.Option(Path("data/pruned.csv"), help="the pruned dataset version"),
    test_manifest: Path = opt.manifest("manifest whose untouched test split evaluates it"),
    out: Path = typer.Option(Path("models/pruned"), help="model folder to write"),
    name: str = typer.Option("pruned", help="version name: metrics/<name>.json"),
    baseline: str = typer.Option("base", help="the version to compare with over the seeds (its plots/evaluate_<name>.json)"),
    summary: Optional[Path] = typer.Option(None, help="prune's summary.json: its predicted change of the validation loss is put beside the measured one"),
    epochs: Optional[int] = typer.Option(None, help="epochs (params: train.epochs)"),
    seed: Optional[List[int]] = typer.Option(None, help="seed(s) (params: train.seeds)"),
    device: Optional[str] = typer.Option(None, help=_one_of("train.device")),
    flags: Optional[Path] = FLAGS_ASIDE,
    decisions: Optional[Path] = DECISIONS_ASIDE,
    params: Path = PARAMS,
):
    """Retrain from scratch on a pruned manifest and evaluate on the untouched test split → metrics/<name>.json.

    Same recipe, fresh initialisation, one run per seed in train.seeds."""
    from pipeline.stages.retrain import retrain as run

    c = _config(params, train__epochs=epochs, train__seeds=list(seed) if seed else None, train__device=device)
    _check_out_dir(out)
    inputs = [("--manifest", manifest), _classes(manifest), ("--test-manifest", test_manifest)]
    inputs += [("--summary", summary)] if summary is not None else []
    _io("retrain", inputs, [("--out", out)], manifest, params)
    _versioned_outputs("retrain", name, inputs, test_manifest, params)
    with RichProgress() as prog:
        m = run(manifest, test_manifest, out, name, c.train, c.seeds, c.train.device,
                opt.METRICS, opt.PLOTS, progress=prog, baseline=baseline, flags_csv=flags, decisions=decisions, summary=summary)
    console.print(table(f"{name}: retrained on {manifest}, tested on {test_manifest}", ["metric", "value"],
                        [("n_train", m["n_train"]), ("accuracy", _pm(m)), *_aside_rows(m), ("loss", m["loss"])]))
    _verdict(name, m)
    if "dval_loss" in m:
        from pipeline.effect import line

        console.print(line(name, m), highlight=False)


sweep_app = typer.Typer(help="The paper's experiment: strategy × keep fraction, retrain, evaluate.", no_args_is_help=True)
app.add_typer(sweep_app, name="sweep")


@sweep_app.command("point")
@handle_errors
def sweep_point(
    strategy: str = typer.Option(..., help=_one_of("prune.strategy", key_note=False)),
    keep: float = typer.Option(..., help="fraction of the training set kept"),
    out: Path = typer.Option(..., help="folder for this point (pruned.csv, metrics.json)"),
    manifest: Path = opt.manifest(),
    scores: Path = opt.scores(),
    flags: Path = opt.flags(),
    params: Path = PARAMS,
):
    """One sweep point: prune, retrain (every seed) and evaluate."""
    from pipeline.stages.sweep import sweep_point as run

    c = _config(params, prune__strategy=strategy, prune__keep=keep)
    _io("sweep point", [("--manifest", manifest), _classes(manifest), ("--scores", scores), ("--flags", flags),
                        _attribution(scores)],
        [("--out", out)] + [("--out", out / f) for f in ("pruned.csv", "prune.json", "metrics.json")]
        + _classes_beside(out / "pruned.csv", manifest), manifest, params)
    with RichProgress() as prog:
        m = run(manifest, scores, out, c.prune, c.train, c.seeds, flags_csv=flags, progress=prog)
    console.print(f"{strategy} keep={keep}: accuracy {m['accuracy_mean']:.4f} ± {m['accuracy_std']:.4f} "
                  f"({m['n_seeds']} seeds, {m['n_kept']} images)", highlight=False)


@sweep_app.command("run")
@handle_errors
def sweep_run(
    out: Path = typer.Option(Path("sweep"), help="folder of the sweep points"),
    summary: Path = typer.Option(Path("plots/sweep.csv"), help="aggregated table (mean ± std accuracy per point)"),
    manifest: Path = opt.manifest(),
    scores: Path = opt.scores(),
    flags: Path = opt.flags(),
    params: Path = PARAMS,
):
    """The whole sweep (the `sweep` DVC stage): every sweep.strategies × sweep.keeps point, then the summary.

    Opt-in: sweep.keeps is empty by default; `dvc exp run -S 'sweep.keeps=[0.1,0.5]'` runs it."""
    from pipeline.stages.sweep import sweep as run

    c = _config(params)
    _io("sweep run", [("--manifest", manifest), _classes(manifest), ("--scores", scores), ("--flags", flags),
                      _attribution(scores)],
        [("--out", out), ("--summary", summary)], manifest, params)
    with RichProgress() as prog:
        df = run(manifest, scores, flags, out, summary, c.sweep, c.prune, c.train, c.seeds, progress=prog)
    if not len(df):
        console.print(f"sweep.keeps is empty: no sweep point (opt-in); wrote an empty {summary}. "
                      "Run it with: dvc exp run -S 'sweep.keeps=[0.1,0.5]'", highlight=False)
        return
    keeps = sorted(df["keep"].unique())
    rows = [(st, *[{r.keep: f"{r.accuracy_mean:.4f} ± {r.accuracy_std:.4f}" for r in g.itertuples()}.get(k, "")
                   for k in keeps]) for st, g in df.groupby("strategy")]
    console.print(table(f"test accuracy (mean ± std over seeds) → {summary}", ["strategy"] + [f"keep {k:g}" for k in keeps], rows))


@sweep_app.command("collect")
@handle_errors
def sweep_collect(
    sweep_dir: Path = typer.Argument(Path("sweep"), help="folder of sweep points"),
    out: Path = typer.Option(Path("sweep/summary.csv"), help="aggregated table"),
    params: Path = PARAMS,
):
    """Aggregate sweep points → sweep/summary.csv (mean ± std accuracy per strategy × keep)."""
    from pipeline.stages.sweep import collect

    c = _config(params)
    _io("sweep collect", [("a sweep result", f) for f in sorted(sweep_dir.glob("*/metrics.json"))], [("--out", out)],
        params=params)
    df = collect(sweep_dir, out, c.sweep.strategies, c.sweep.keeps)
    keeps = sorted(df["keep"].unique())
    rows = []
    for st, g in df.groupby("strategy"):
        cell = {r.keep: f"{r.accuracy_mean:.4f} ± {r.accuracy_std:.4f}" for r in g.itertuples()}
        rows.append((st, *[cell.get(k, "") for k in keeps]))
    console.print(table(f"test accuracy (mean ± std over seeds) → {out}", ["strategy"] + [f"keep {k:g}" for k in keeps], rows))


from .visual import compare, figures, report, show  # noqa: E402  (typer/rich/pathlib only)
from .review import review  # noqa: E402  (typer/pathlib only)
from .project import demo, init, versions  # noqa: E402  (typer/pathlib only)

for _fn in (show, report, compare, figures, review, init, versions, demo):
    app.command()(_fn)


if __name__ == "__main__":
    app()
