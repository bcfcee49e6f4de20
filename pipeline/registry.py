"""Registries: one per concept (scores, flag rules, prune strategies, data sources).

A registry maps a name to an :class:`Entry` saying what the thing needs, which end of its
value is suspicious, and a one-line doc. params.py's allowed values, the CLI help, the README
tables and the report read the registries; no other file spells the lists. Adding a score, a
rule, a strategy or a source is one decorated function, registered where the function lives
(as timm's ``register_model``); an entry's ``fn`` is what runs, and every entry of a registry
is called the same way (:data:`CALLING`)::

    from pipeline.registry import STRATEGIES

    @STRATEGIES.register("gradient-cdf", needs=("score",), doc="sample ∝ prune.by, without replacement")
    def gradient_cdf(inputs: PruneInputs) -> PruneResult: ...

A registry imports its modules (``modules``) on first use, never before: `clean --help` pays
for no registration it does not read, and no file imports a module for its side effect. The
order users see is the order of ``modules``, then the order of the decorators in a module.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

#: What an entry may need (checked when registering, so a typo fails at import).
NEEDS = frozenset({
    "forward",      # one eval-mode forward pass of the model over the images
    "backward",     # per-sample gradients (per-layer norms) — a backward pass
    "dynamics",     # per-epoch training dynamics (models/<name>/dynamics.npz)
    "checkpoints",  # the epoch checkpoints saved by `clean train`
    "embeddings",   # penultimate features of the model
    "val",          # the validation split
    "images",       # the decoded images themselves
    "model",        # a trained model folder
    "training",     # extra training runs (k-fold cross-fitting)
    "score",        # a score column of scores.csv
    "probs",        # the running mean over epochs of each sample's pre-update softmax (dynamics.npz)
    "flags",        # scores/flags.csv
    "root",         # a path given in data.root
})


@dataclass(frozen=True)
class Entry:
    """One registered item: `name`, its function, what it needs, the suspicious end, a doc line."""

    name: str
    fn: Callable | None
    needs: tuple[str, ...] = ()
    suspicious: str = "high"   # "high" | "low": which end of the value marks a suspicious sample
    doc: str = ""
    extra: dict = field(default_factory=dict)


class Registry:
    """An ordered name → :class:`Entry` mapping for one concept.

    `modules`: the modules whose decorators register the entries, imported on first use; their
    order (then the decorators' order within a module) is the order of :meth:`names`, whatever
    order Python happens to import them in."""

    def __init__(self, concept: str, modules: tuple[str, ...] = ()):
        self.concept = concept
        self.modules = tuple(modules)
        self._entries: dict[str, Entry] = {}
        self._rank: dict[str, tuple[int, int]] = {}
        self._loaded = False

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            import importlib

            for m in self.modules:
                importlib.import_module(m)

    def register(self, name: str, *, needs: tuple[str, ...] = (), suspicious: str = "high", doc: str = "",
                 **extra):
        """Decorator: register `fn` under `name` (a name may be registered once)."""
        return self.register_family({name: dict(needs=needs, suspicious=suspicious, doc=doc, **extra)})

    def register_family(self, members: dict[str, dict]):
        """Decorator: register one `fn` under several names at once — a family that computes
        several values in one pass (e.g. loss, grad_norm, el2n and margin from one forward
        pass). `members`: {name: dict(needs=..., suspicious=..., doc=..., **extra)}, in order."""
        for name, meta in members.items():
            bad = set(meta.get("needs", ())) - NEEDS
            if bad:
                raise ValueError(f"{self.concept} {name!r}: unknown needs {sorted(bad)}")
            if meta.get("suspicious", "high") not in ("high", "low"):
                raise ValueError(f"{self.concept} {name!r}: suspicious must be 'high' or 'low'")

        def deco(fn):
            module = self.modules.index(fn.__module__) if fn.__module__ in self.modules else len(self.modules)
            for name, meta in members.items():
                if name in self._entries:
                    raise ValueError(f"{self.concept} {name!r} is registered twice")
                meta = dict(meta)
                needs, suspicious, doc = tuple(meta.pop("needs", ())), meta.pop("suspicious", "high"), meta.pop("doc", "")
                self._entries[name] = Entry(name, fn, needs, suspicious, doc, meta)
                self._rank[name] = (module, len(self._rank))
            return fn

        return deco

    def _ordered(self) -> list[str]:
        self._load()
        return sorted(self._entries, key=self._rank.__getitem__)

    def families(self) -> list[Callable]:
        """The distinct entry functions, in entry order (a family's function once)."""
        return list(dict.fromkeys(self._entries[n].fn for n in self._ordered()))

    def __getitem__(self, name: str) -> Entry:
        self._load()
        return self._entries[name]

    def get(self, name: str) -> Entry | None:
        self._load()
        return self._entries.get(name)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._ordered())

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def __eq__(self, other) -> bool:
        """A registry equals the sequence of its names (registration order)."""
        if isinstance(other, (list, tuple)):
            return tuple(self.names()) == tuple(other)
        return self is other

    __hash__ = object.__hash__

    def names(self) -> list[str]:
        """The registered names, in order (`modules`, then registration)."""
        return self._ordered()

    def entries(self) -> list[Entry]:
        return [self._entries[n] for n in self._ordered()]

    def help(self, sep: str = " | ") -> str:
        """'a | b | c': the names, for option help texts."""
        return sep.join(self.names())

    def low_is_suspicious(self) -> frozenset[str]:
        """Names whose *low* values are the suspicious ones."""
        self._load()
        return frozenset(n for n, e in self._entries.items() if e.suspicious == "low")


_RULE_MODULES = tuple(f"pipeline.rules.{m}" for m in (
    "labels", "threshold", "outliers", "confident", "duplicates", "images", "influence"))

#: Per-sample scores (columns of scores/scores.csv, in this order): score families
#: ``fn(inputs: ScoreInputs, config: ScoreConfig) -> {column: float [N]}`` (pipeline/scores/inputs.py).
SCORES = Registry("score", ("pipeline.scores.compute", "pipeline.scores.dynamics", "pipeline.scores.tracin",
                            "pipeline.scores.importance"))
#: Flag rules (the label rule that drives `flagged`): ``fn(inputs: RuleInputs, config: FlagConfig) -> FlagResult``.
RULES = Registry("flag rule", _RULE_MODULES)
#: Issue types (label, duplicate, outlier, image properties, ...): each one `is_<type>` / `<type>_score`
#: pair in scores/flags.csv: ``fn(inputs: RuleInputs, config: FlagConfig) -> IssueResult``.
ISSUES = Registry("issue type", _RULE_MODULES)
#: Prune strategies (remedies): ``fn(inputs: PruneInputs) -> PruneResult`` (pipeline/strategies.py).
STRATEGIES = Registry("prune strategy", ("pipeline.strategies", "pipeline.relabel"))
#: Data sources for `clean prepare`: ``fn(root, out_dir, classes, progress) -> Source`` (pipeline/data/sources.py).
SOURCES = Registry("data source", ("pipeline.data.sources",))

#: how every entry of each registry is called (the one calling form; tests/test_registry.py runs them all)
CALLING = {"SCORES": "fn(ScoreInputs, ScoreConfig) -> {column: [N]}", "RULES": "fn(RuleInputs, FlagConfig) -> FlagResult",
           "ISSUES": "fn(RuleInputs, FlagConfig) -> IssueResult", "STRATEGIES": "fn(PruneInputs) -> PruneResult",
           "SOURCES": "fn(root, out_dir, classes, progress) -> Source"}


# --------------------------------------------------------------------------- README tables

#: the registries whose tables README.md carries, between <!-- registry:NAME --> and <!-- /registry -->
TABLES = {"SCORES": (SCORES, "score column"), "RULES": (RULES, "`flag.method`"), "ISSUES": (ISSUES, "issue type"),
          "STRATEGIES": (STRATEGIES, "`prune.strategy`"), "SOURCES": (SOURCES, "`data.source`")}


def markdown_table(name: str) -> str:
    """The README table of registry `name`: one row per entry (name, needs, suspicious end, doc)."""
    reg, head = TABLES[name]
    rows = [f"| {head} | needs | what it is |", "|---|---|---|"]
    for e in reg.entries():
        low = " (low = suspicious)" if e.suspicious == "low" else ""
        rows.append(f"| `{e.name}` | {', '.join(e.needs) or '—'} | {e.doc}{low} |")
    return "\n".join(rows)


def rewrite_readme(text: str) -> str:
    """README text with every registry table regenerated from the registries."""

    def one(m):
        return f"<!-- registry:{m.group(1)} -->\n{markdown_table(m.group(1))}\n<!-- /registry -->"

    return re.sub(r"<!-- registry:(\w+) -->.*?<!-- /registry -->", one, text, flags=re.S)


if __name__ == "__main__":  # python -m pipeline.registry README.md: regenerate its registry tables
    import sys
    from pathlib import Path

    from pipeline import registry  # the registries the modules register into (this file runs as __main__)

    path = Path(sys.argv[1] if len(sys.argv) > 1 else "README.md")
    from pipeline.io import write_text

    write_text(path, registry.rewrite_readme(path.read_text()))
