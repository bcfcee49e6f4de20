"""`clean review`: decide on the flagged samples in the browser → data/decisions.csv.

A plain function with Typer-annotated parameters, registered in cli/main.py with
``app.command()(fn)``; the server and the page are pipeline/views/review.py (imported inside
the command, so `clean --help` stays instant).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .options import guard
from .ui import console, handle_errors


@handle_errors
def review(
    manifest: Path = typer.Option(Path("data/manifest.csv"), help="manifest the flags come from (its images are shown)"),
    flags: Path = typer.Option(Path("scores/flags.csv"), help="flags from `clean flag`: the samples to review"),
    scores: Path = typer.Option(Path("scores/scores.csv"), help="scores shown beside each sample (used when it exists)"),
    decisions: Path = typer.Option(Path("data/decisions.csv"), help="where each decision is saved as it is made "
                                   "(created with its header when missing; `clean prune` applies it)"),
    port: int = typer.Option(0, min=0, max=65535, help="port on 127.0.0.1 (0 = a free one)"),
    at: Optional[int] = typer.Option(None, help="open at this sample id (as the report's cards name it)"),
    browser: bool = typer.Option(True, "--browser/--no-browser", help="open the page in the default browser"),
):
    """Review the flagged samples in the browser: keep / drop / relabel each → data/decisions.csv.

    Serves one page on 127.0.0.1 only, at an address with a random token; every decision is
    written at once (atomically), so stopping (Ctrl-C) and reopening resumes where you were.
    Keys: K keep, D drop, R relabel (then 0-9 / Enter = the suggested class), → / ← next / previous, U undo.
    Then `clean prune` (or `dvc repro`) makes the reviewed dataset version."""
    from pipeline.errors import CleanError
    from pipeline.views.review import Review, serve, url, wait

    guard("review", [("--manifest", manifest), ("--flags", flags), ("--scores", scores)], [("--decisions", decisions)])
    r = Review(manifest, flags, decisions, scores)
    try:
        server = serve(r, port)
    except OSError as e:
        raise CleanError(f"--port {port}: cannot listen on 127.0.0.1:{port} ({e.strerror or e}); "
                         "choose another port or 0 for a free one") from None
    address = url(server, at)
    console.print(f"review: {len(r.items)} flagged samples, {r.reviewed()} already decided → {decisions}",
                  highlight=False)
    console.print(f"open {address}\n(only this machine can reach it; Ctrl-C stops the server, decisions are already saved)",
                  highlight=False, soft_wrap=True)
    if browser:
        import webbrowser

        webbrowser.open(address)
    wait(server)
    console.print(f"review stopped: {r.reviewed()} of {len(r.items)} decided in {decisions}; "
                  "`clean prune` (or `dvc repro`) applies them", highlight=False)
