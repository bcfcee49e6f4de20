"""Registries: one per concept (scores, flag rules, prune strategies, data sources).

A registry maps a name to an :class:`Entry` saying what the thing needs, which end of its
value is suspicious, and a one-line doc. params.py's allowed values, the CLI help, the README
tables and the report read the registries; no other file spells the lists. Adding a score, a
rule, a strategy or a source is one entry plus its function, registered where the function
lives (as timm's ``register_model``)::

    from pipeline.registry import STRATEGIES

    @STRATEGIES.register("gradient-cdf", needs=("score",), doc="sample ∝ score, without replacement")
    def gradient_cdf(...): ...
"""
from __future__ import annotations

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
    """An ordered name → :class:`Entry` mapping for one concept (registration order is kept)."""

    def __init__(self, concept: str, loader: str | None = None):
        self.concept = concept
        self._entries: dict[str, Entry] = {}
        self._loader = loader  # module whose import registers the entries (loaded lazily)

    def _load(self) -> None:
        if self._loader is not None:
            loader, self._loader = self._loader, None
            import importlib

            importlib.import_module(loader)

    def register(self, name: str, *, needs: tuple[str, ...] = (), suspicious: str = "high", doc: str = "",
                 **extra):
        """Decorator: register `fn` under `name` (a name may be registered once)."""
        bad = set(needs) - NEEDS
        if bad:
            raise ValueError(f"{self.concept} {name!r}: unknown needs {sorted(bad)}")
        if suspicious not in ("high", "low"):
            raise ValueError(f"{self.concept} {name!r}: suspicious must be 'high' or 'low'")

        def deco(fn):
            if name in self._entries:
                raise ValueError(f"{self.concept} {name!r} is registered twice")
            self._entries[name] = Entry(name, fn, tuple(needs), suspicious, doc, dict(extra))
            return fn

        return deco

    def add(self, name: str, **kw) -> None:
        """Register an entry that has no function of its own (e.g. a score computed in a family)."""
        self.register(name, **kw)(None)

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
        self._load()
        return iter(list(self._entries))

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
        """The registered names, in registration order."""
        self._load()
        return list(self._entries)

    def entries(self) -> list[Entry]:
        self._load()
        return list(self._entries.values())

    def help(self, sep: str = " | ") -> str:
        """'a | b | c': the names, for option help texts."""
        return sep.join(self.names())

    def low_is_suspicious(self) -> frozenset[str]:
        """Names whose *low* values are the suspicious ones."""
        self._load()
        return frozenset(n for n, e in self._entries.items() if e.suspicious == "low")


#: Per-sample scores (columns of scores/scores.csv) — registered in pipeline/scores/__init__.py.
SCORES = Registry("score", loader="pipeline.scores")
#: Flag rules (issue detectors) — registered in pipeline/rules/.
RULES = Registry("flag rule", loader="pipeline.rules")
#: Issue types (label, duplicate, outlier, image properties, ...): each one `is_<type>` / `<type>_score`
#: pair in scores/flags.csv — registered in pipeline/rules/.
ISSUES = Registry("issue type", loader="pipeline.rules")
#: Prune strategies (remedies) — registered in pipeline/strategies.py.
STRATEGIES = Registry("prune strategy", loader="pipeline.strategies")
#: Data sources for `clean prepare` — registered in pipeline/data/sources.py.
SOURCES = Registry("data source", loader="pipeline.data.sources")


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
    import re

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
