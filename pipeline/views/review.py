"""`clean review`: a person looks at the flagged samples in the browser and decides on each.

A small local server (Python's http.server, standard library only) that serves exactly two
things: the review page and the images of the manifest's samples, by id. Every decision the
page sends is written at once, atomically, to ``data/decisions.csv`` (pipeline/decisions.py),
so closing the browser, Ctrl-C or a crash loses nothing and reopening shows every decision.

Why a server rather than a self-contained page that exports a CSV: a page opened from disk
can only hand its decisions back by a download the person must remember to make and move to
``data/decisions.csv`` — decisions made and not exported are lost, and a 500-image page would
embed every image. The server saves each decision as it is made, into the file `prune` and
DVC read, and the page stays small (images load one at a time).

Security (the server runs with the user's rights on their machine):

- bound to 127.0.0.1 only, on a random free port (or --port);
- a random token (``secrets.token_urlsafe``) is the first path segment of every URL; a
  request without it, or with another, gets 403 and nothing;
- the ``Host`` header must be 127.0.0.1/localhost with this port (DNS rebinding), a POST's
  ``Origin`` (when sent) this server's, and its body JSON of at most 16 KiB;
- images are served by manifest id only (``<token>/img/<id>.png``): the file path comes from
  the manifest, never from the URL, so no path outside the manifest can be read; there is no
  directory listing and no other file;
- a decision for an id that is not under review, an unknown action or class is refused
  (400 + message) and changes nothing.
"""
from __future__ import annotations

import hmac
import io
import json
import re
import secrets
import signal
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np

from pipeline.data.images import load_images
from pipeline.decisions import ACTIONS, MAX_NOTE, class_index, write_decisions
from pipeline.errors import CleanError
from pipeline.formats.jsonfile import read_json
from pipeline.formats.manifest import classes_path_for, read_classes, read_manifest
from pipeline.formats.tables import read_flags, read_scores
from pipeline.views.grid import to_pil
from pipeline.views.why import why

#: Extra score columns of scores.csv shown with each sample (when present): a display choice.
SHOWN_SCORES = ("loss", "aum", "margin", "confidence", "grad_norm", "forgetting")
#: Decoded images kept in memory (PNG bytes).
IMAGE_CACHE = 2048
#: Largest POST body accepted (bytes).
MAX_BODY = 16 * 1024


def _stamp(path: Path) -> tuple | None:
    """What tells a file changed: (inode, size, mtime in ns); None when it is missing."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _valid_text(text: str) -> str:
    """`text` with lone surrogates (JSON allows "\\ud800", UTF-8 cannot hold it) as U+FFFD."""
    return re.sub("[\ud800-\udfff]", "\ufffd", text)


def _num(v):
    """float → JSON-able (None for NaN/inf), rounded for display."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return round(f, 4) if np.isfinite(f) else None


class Review:
    """What the review shows and the decisions made: built from the manifest, flags.csv (and
    issues.json beside it, scores.csv when given); `decide` validates and saves one decision."""

    def __init__(self, manifest: str | Path, flags_csv: str | Path, decisions_csv: str | Path,
                 scores_csv: str | Path | None = None):
        from pipeline.decisions import ensure_file, read_decisions

        self.manifest, self.flags_csv, self.decisions_csv = Path(manifest), Path(flags_csv), Path(decisions_csv)
        self.classes = read_classes(classes_path_for(self.manifest))["classes"]
        mdf = read_manifest(self.manifest, self.classes)
        train = mdf[mdf["split"] == "train"]
        fl = read_flags(self.flags_csv, train["id"].to_numpy())
        held = read_flags(self.flags_csv, heldout=True)  # + val/test label issues: a person can correct a test label
        if "split" in held.columns and (held["split"] != "train").any():
            import pandas as pd

            fl = pd.concat([fl, held[held["split"] != "train"]], ignore_index=True)
        issues = {}
        if (self.flags_csv.parent / "issues.json").exists():
            issues = read_json(self.flags_csv.parent / "issues.json", "not found", "re-run `clean flag`")
        sc = None
        if scores_csv is not None and Path(scores_csv).exists():
            sc = read_scores(scores_csv).set_index("id")
        self.base = self.manifest.parent
        self.paths = dict(zip(mdf["id"].tolist(), mdf["path"].tolist()))
        self.types = [c[3:] for c in fl.columns if c.startswith("is_")]
        rows = mdf.set_index("id")
        self.items = self._items(fl, rows, sc, issues)
        self.under_review = {it["id"] for it in self.items}
        self.groups = self._groups(fl, rows, issues)
        self.members = {m["id"]: m for ms in self.groups.values() for m in ms}
        ensure_file(self.decisions_csv)
        self.decisions = read_decisions(self.decisions_csv, self.classes, self.paths, self.manifest)
        self._seen = _stamp(self.decisions_csv)  # a hand edit while serving is read back, never overwritten
        self.token = secrets.token_urlsafe(18)
        self.lock = threading.Lock()
        self._images: dict[int, bytes] = {}

    # ------------------------------------------------------------------ data

    def _items(self, fl, rows, sc, issues=None) -> list[dict]:
        """One entry per flagged training sample (any issue type, or the driving rule), ordered by
        issue type (flags.csv order), then by that type's score (most severe first), then id."""
        types = self.types
        flagged = fl["flagged"].to_numpy(bool)
        hit = np.zeros(len(fl), bool) | flagged
        for t in types:
            hit |= fl[f"is_{t}"].to_numpy(bool)
        items = []
        for r in fl[hit].to_dict("records"):
            rid = int(r["id"])
            its = [t for t in types if r[f"is_{t}"]]
            scores = {t: _num(r.get(f"{t}_score")) for t in its}
            if not its:  # flagged by the rule only (a flags.csv without issue columns)
                its, scores = ["flagged"], {"flagged": _num(r.get("value"))}
            m = rows.loc[rid]
            sug = r.get("suggested_label")
            it = {"id": rid, "label": int(m["label"]), "split": str(m["split"]), "types": its, "scores": scores,
                  "rule": str(r.get("rule", "")) if r["flagged"] else "", "value": _num(r.get("value")) if r["flagged"] else None,
                  "sug": int(sug) if sug is not None and sug == sug and 0 <= sug < len(self.classes) else None,
                  "sug_p": _num(r.get("suggested_p")),
                  "group": int(r["duplicate_group"]) if r.get("duplicate_group", -1) == r.get("duplicate_group", -1)
                  and r.get("duplicate_group", -1) >= 0 else None}
            it["why"] = {t: why(r, t, (issues or {}).get(t)) for t in its}
            if "noisy" in rows.columns:
                it["noisy"] = int(m["noisy"])
            if sc is not None and rid in sc.index:
                s = sc.loc[rid]
                it["pred"] = int(s["pred"]) if "pred" in sc.columns else None
                it["more"] = {c: _num(s[c]) for c in SHOWN_SCORES if c in sc.columns and _num(s[c]) is not None}
            items.append(it)
        order = {t: k for k, t in enumerate(types + ["flagged"])}
        items.sort(key=lambda it: (order[it["types"][0]], -(it["scores"][it["types"][0]] or -np.inf), it["id"]))
        return items

    def _groups(self, fl, rows, issues: dict) -> dict[int, list[dict]]:
        """duplicate group → its members (train ones from flags.csv; val/test ones that issues.json names)."""
        if "duplicate_group" not in fl.columns:
            return {}
        g = fl[fl["duplicate_group"].fillna(-1) >= 0]
        want = {it["group"] for it in self.items if it["group"] is not None}
        from pipeline.views.sets import eval_members

        group_of = dict(zip(g["id"].tolist(), g["duplicate_group"].astype(int).tolist()))
        out: dict[int, list[dict]] = {}
        for rid, gid in group_of.items():
            if gid in want:
                out.setdefault(gid, []).append(rid)
        dup = issues.get("duplicate") if isinstance(issues, dict) else None
        for gid, evs in eval_members(dup, group_of).items():
            if gid in out:
                out[gid] += [rid for rid in evs if rid in rows.index and rid not in out[gid]]
        return {gid: [{"id": int(i), "label": int(rows.loc[i, "label"]), "split": str(rows.loc[i, "split"])}
                      for i in sorted(ids)] for gid, ids in out.items()}

    def state(self) -> dict:
        """Everything the page needs, as JSON-able data."""
        dec = {str(i): {"action": d["action"], "label": d["label"], "note": d.get("note", "")}
               for i, d in self.decisions.items()}
        return {"classes": self.classes, "types": self.types + (["flagged"] if any(
            it["types"] == ["flagged"] for it in self.items) else []), "items": self.items,
                "groups": {str(k): v for k, v in self.groups.items()}, "decisions": dec,
                "decisions_file": str(self.decisions_csv), "total": len(self.items)}

    def reviewed(self) -> int:
        return sum(1 for i in self.decisions if i in self.under_review)

    # ------------------------------------------------------------------ actions

    def decide(self, body: dict) -> dict:
        """Validate one decision {id, action keep|drop|relabel|clear, label (class name or index),
        note}, apply it and write decisions.csv atomically. CleanError (→ 400) changes nothing."""

        if not isinstance(body, dict):
            raise CleanError("a decision is a JSON object {id, action, label, note}")
        rid = body.get("id")
        if isinstance(rid, str) and re.fullmatch(r"-?\d{1,18}", rid.strip()):
            rid = int(rid)
        if isinstance(rid, bool) or not isinstance(rid, int) or rid not in self.under_review:
            raise CleanError(f"unknown id {rid!r}: not a flagged training sample of {self.manifest} under review")
        action = body.get("action")
        if action not in (*ACTIONS, "clear"):
            raise CleanError(f"unknown action {action!r}; use one of {', '.join(ACTIONS)} (or clear)")
        label = None
        if action == "relabel":
            raw = body.get("label")
            label = class_index(raw, self.classes) if isinstance(raw, (str, int)) and not isinstance(raw, bool) else None
            if label is None:
                raise CleanError(f"unknown class {raw!r}; relabel to one of: {', '.join(self.classes)}")
        note = body.get("note") or ""
        if not isinstance(note, str):
            raise CleanError("note must be text")
        note = " ".join(_valid_text(note).split())[:MAX_NOTE]
        with self.lock:
            self._reread_if_edited()
            new = dict(self.decisions)
            if action == "clear":
                new.pop(rid, None)
            else:
                new[rid] = {"action": action, "label": label, "note": note}
            write_decisions(self.decisions_csv, new, self.classes, self.paths)
            self.decisions, self._seen = new, _stamp(self.decisions_csv)
            return {"ok": True, "id": rid, "decision": new.get(rid), "reviewed": self.reviewed(),
                    "total": len(self.items)}

    def _reread_if_edited(self) -> None:
        """When decisions.csv changed on disk since this server last read or wrote it (a hand edit),
        read it again, so the next write keeps those edits (merged: the new decision on top).
        A file that no longer reads is refused (409) and left as the person made it."""
        from pipeline.decisions import read_decisions

        if _stamp(self.decisions_csv) == self._seen:
            return
        try:
            self.decisions = read_decisions(self.decisions_csv, self.classes, self.paths, self.manifest)
        except CleanError as e:
            err = CleanError(f"{self.decisions_csv} was changed outside the review and cannot be read ({e}); "
                             "nothing was saved: fix the file, then decide again")
            err.conflict = True
            raise err from None
        self._seen = _stamp(self.decisions_csv)

    def image(self, rid: int) -> bytes:
        """PNG bytes of manifest sample `rid` (decoded with the project's reader)."""

        with self.lock:
            if rid in self._images:
                return self._images[rid]
        im = to_pil(load_images([self.paths[rid]], self.base)[0])
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        data = buf.getvalue()
        with self.lock:
            if len(self._images) >= IMAGE_CACHE:
                self._images.pop(next(iter(self._images)))
            self._images[rid] = data
        return data

    def page(self) -> bytes:
        return PAGE.replace("__DATA__", script_json(self.state())).encode("utf-8")


# ---------------------------------------------------------------------- server


def script_json(obj) -> str:
    """`obj` as JSON safe inside an HTML <script> element: `<`, `>`, `&` and U+2028/U+2029 are
    written as \\u escapes (as Django's json_script does), so no value can end the element
    (`</script`), open a comment (`<!--`) or a new script (`<script`), whatever it holds."""
    text = json.dumps(obj, separators=(",", ":"))  # ensure_ascii: lone surrogates and U+2028/9 are escaped
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


class _Handler(BaseHTTPRequestHandler):
    """One request to the review server; `review` and `port_of` are set by :func:`make_handler`.
    Every request gets an answer: an unexpected error is a 500 with a JSON/text message, never
    a dropped connection."""

    server_version = "clean-review"
    sys_version = ""
    review: Review
    port_of = None

    def log_message(self, fmt, *args):  # quiet: the command prints its own lines
        pass

    def do_GET(self):  # noqa: N802
        self._answer(_get)

    def do_POST(self):  # noqa: N802
        self._answer(_post)

    def _answer(self, fn) -> None:
        try:
            fn(self, self.review)
        except Exception as e:  # noqa: BLE001 - a bug must still answer the page, not drop it
            _refuse(self, 500, f"internal error: {type(e).__name__}: {' '.join(str(e).split())[:300]}")


def make_handler(review: Review, port_of):
    """The request handler class for `review`; port_of() → the port the server listens on."""
    return type("Handler", (_Handler,), {"review": review, "port_of": staticmethod(port_of)})


_CSP = ("default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "connect-src 'self'; frame-ancestors 'none'")


def _send(h: BaseHTTPRequestHandler, status: int, body: bytes, ctype: str, cache: str = "no-store") -> None:
    h.send_response(status)
    for k, v in (("Content-Type", ctype), ("Content-Length", str(len(body))), ("Cache-Control", cache),
                 ("X-Content-Type-Options", "nosniff"), ("Referrer-Policy", "no-referrer"),
                 ("X-Frame-Options", "DENY"), ("Content-Security-Policy", _CSP)):
        h.send_header(k, v)
    h.end_headers()
    if h.command != "HEAD":
        h.wfile.write(body)


def _refuse(h: BaseHTTPRequestHandler, status: int, msg: str) -> None:
    if "/api/" in h.path:
        _send(h, status, json.dumps({"ok": False, "error": msg}).encode(), "application/json")
    else:
        _send(h, status, (msg + "\n").encode("utf-8", "replace"), "text/plain; charset=utf-8")


def _route(h: _Handler) -> list[str] | None:
    """Checks shared by every request → the path segments after the token (None: refused)."""
    port = h.port_of()
    host = (h.headers.get("Host") or "").strip().lower()
    if host not in {f"127.0.0.1:{port}", f"localhost:{port}"}:
        _refuse(h, 403, f"forbidden: Host {host!r}; this review server answers 127.0.0.1:{port} only")
        return None
    parts = urlsplit(h.path).path.split("/")
    if len(parts) < 2 or not hmac.compare_digest(parts[1].encode(), h.review.token.encode()):
        _refuse(h, 403, "forbidden: missing or wrong token; open the address `clean review` printed")
        return None
    return parts[2:]


def _get(h: _Handler, review: Review) -> None:
    parts = _route(h)
    if parts is None:
        return
    if parts in ([], [""]):
        if not h.path.split("?")[0].endswith("/"):
            h.send_response(301)
            h.send_header("Location", f"/{review.token}/")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        return _send(h, 200, review.page(), "text/html; charset=utf-8")
    if len(parts) == 2 and parts[0] == "img":
        m = re.fullmatch(r"(\d{1,18})\.png", parts[1])
        if not m or int(m.group(1)) not in review.paths:
            return _refuse(h, 404, f"not found: {'/'.join(parts)!r}; images are served by the id of a "
                                   f"sample of {review.manifest} only (img/<id>.png)")
        try:
            data = review.image(int(m.group(1)))
        except CleanError as e:
            return _refuse(h, 404, f"image of id {m.group(1)} cannot be read: {e}")
        return _send(h, 200, data, "image/png", "private, max-age=3600")
    if parts == ["api", "state"]:
        with review.lock:
            body = json.dumps(review.state()).encode()
        return _send(h, 200, body, "application/json")
    return _refuse(h, 404, f"not found: {'/'.join(parts)!r}; this server serves the review page and "
                           "the manifest's images only")


def _post(h: _Handler, review: Review) -> None:
    parts = _route(h)
    if parts is None:
        return
    if parts != ["api", "decision"]:
        return _refuse(h, 404, f"not found: {'/'.join(parts)!r}; decisions go to api/decision")
    origin, port = h.headers.get("Origin"), h.port_of()
    if origin is not None and origin.lower() not in {f"http://127.0.0.1:{port}", f"http://localhost:{port}"}:
        return _refuse(h, 403, f"forbidden: Origin {origin!r}")
    try:
        n = int(h.headers.get("Content-Length") or 0)
    except ValueError:
        n = -1
    if not 0 < n <= MAX_BODY:
        return _refuse(h, 400, f"a decision is a JSON body of 1..{MAX_BODY} bytes")
    if "application/json" not in (h.headers.get("Content-Type") or ""):
        return _refuse(h, 415, "a decision must be sent as application/json")
    try:
        body = json.loads(h.rfile.read(n).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: `[[[[...` nested too deep
        return _refuse(h, 400, "a decision must be valid JSON {id, action, label, note}")
    try:
        res = review.decide(body)
    except CleanError as e:
        return _refuse(h, 409 if getattr(e, "conflict", False) else 400, str(e))
    except OSError as e:  # a full disk, a read-only folder: the user's to fix; nothing was changed
        from pipeline.io import describe_os_error

        return _refuse(h, 507 if e.errno in _NO_SPACE else 500,
                       f"decision not saved: {describe_os_error(e, review.decisions_csv)}")
    _send(h, 200, json.dumps(res).encode(), "application/json")


_NO_SPACE = {28, 122}  # ENOSPC, EDQUOT


def serve(review: Review, port: int = 0) -> ThreadingHTTPServer:
    """Start serving `review` on 127.0.0.1:`port` (0 = a free one) in a daemon thread; returns the
    server (its URL: :func:`url`; stop with .shutdown()). OSError when the port is taken."""
    holder: dict = {}
    server = ThreadingHTTPServer(("127.0.0.1", port), make_handler(review, lambda: holder["port"]))
    server.daemon_threads = True
    holder["port"] = server.server_address[1]
    server.review = review
    threading.Thread(target=server.serve_forever, name="clean-review", daemon=True).start()
    return server


def url(server, at: int | None = None) -> str:
    """The page's address (with the token), optionally opened at sample `at`."""
    return f"http://127.0.0.1:{server.server_address[1]}/{server.review.token}/" + (f"#id={at}" if at is not None else "")


def wait(server) -> None:
    """Block until Ctrl-C or SIGTERM, then shut the server down (every decision is already saved)."""

    def stop(*_):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop) if threading.current_thread() is threading.main_thread() else None
    try:
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)
        server.shutdown()
        server.server_close()


# ---------------------------------------------------------------------- page

PAGE = r"""<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>clean review</title>
<style>
*{box-sizing:border-box}
body{font-family:system-ui,-apple-system,'DejaVu Sans',sans-serif;margin:0;color:#1d1d1f;background:#f4f5f7}
header{position:sticky;top:0;z-index:5;background:#23395d;color:#fff;padding:8px 16px;display:flex;flex-wrap:wrap;gap:8px 18px;align-items:center}
header h1{font-size:17px;margin:0}
#progress{font-weight:600;font-size:15px}
#bar{height:6px;width:160px;background:#ffffff44;border-radius:3px;overflow:hidden}#bar>div{height:100%;background:#7fd18b;width:0}
header label{font-size:13px}header select{font-size:13px;margin-left:4px}
#saved{font-size:12px;opacity:.85;min-width:9em}
main{display:grid;grid-template-columns:minmax(300px,460px) 1fr;gap:16px;padding:14px 16px;max-width:1280px}
.panel{background:#fff;border:1px solid #e2e2e2;border-radius:8px;padding:12px}
#img{display:block;width:100%;aspect-ratio:1/1;object-fit:contain;image-rendering:pixelated;background:#111;border-radius:4px}
#pos{font-size:13px;color:#555;margin:6px 0 0}
h2{font-size:18px;margin:0 0 8px}
.kv{border-collapse:collapse;font-size:14px;margin:4px 0 8px}.kv td{padding:3px 10px 3px 0;vertical-align:top}.kv td:first-child{color:#666}
.tag{display:inline-block;background:#e8edf4;color:#23395d;border-radius:10px;padding:1px 8px;margin:0 4px 2px 0;font-size:12.5px}
.sug{color:#0a6b2e;font-weight:600}
.actions{display:flex;flex-wrap:wrap;gap:8px;margin:10px 0}
button{font-size:15px;padding:8px 14px;border-radius:6px;border:1px solid #bbb;background:#fff;cursor:pointer}
button kbd{font-size:11px;color:#666;margin-left:4px}
#keep{border-color:#2d8a47}#drop{border-color:#c81e1e}#relabel{border-color:#b07800}
button.on{color:#fff}#keep.on{background:#2d8a47}#drop.on{background:#c81e1e}#relabel.on{background:#b07800}
#classes{display:none;flex-wrap:wrap;gap:6px;margin:4px 0 10px}#classes.open{display:flex}
#classes button{font-size:13px;padding:5px 10px}#classes button.cur{outline:3px solid #b07800}
#decision{font-size:14px;margin:6px 0;min-height:1.4em}#decision b{text-transform:uppercase}
#note{width:100%;font-size:13px;padding:5px}
#group{margin-top:12px}.members{display:flex;flex-wrap:wrap;gap:8px}
.member{width:132px;font-size:12px;border:1px solid #ddd;border-radius:5px;padding:4px;background:#fafafa}
.member img{width:100%;aspect-ratio:1/1;object-fit:contain;image-rendering:pixelated;background:#111;display:block}
.member.self{border:2px solid #23395d}.member.eval{border-color:#c81e1e}
#keys{font-size:12px;color:#555;line-height:1.6}kbd{border:1px solid #ccc;border-bottom-width:2px;border-radius:3px;padding:0 4px;background:#fff;font-size:11px}
#strip{grid-column:1/-1;display:flex;flex-wrap:wrap;gap:3px;align-content:flex-start;max-height:170px;overflow:auto;position:relative}
#strip a{font-size:11px;padding:2px 5px;border-radius:3px;background:#e6e6e6;color:#333;text-decoration:none;cursor:pointer}
#strip a.keep{background:#c9ebd2}#strip a.drop{background:#f6c9c9}#strip a.relabel{background:#f7e2b0}#strip a.cur{outline:2px solid #23395d}
#msg{color:#c81e1e;font-size:13px;min-height:1.2em}
.empty{padding:30px;font-size:16px}
@media (max-width:760px){main{grid-template-columns:1fr;padding:8px}header{padding:6px 10px}#bar{width:90px}
 #img{width:min(100%,44vh);margin:0 auto}
 button{padding:10px 12px}.member{width:100px}}
</style></head><body>
<header><h1>clean review</h1>
<span id="progress" aria-live="polite">0 of 0 reviewed</span><div id="bar"><div></div></div>
<label>issue<select id="ftype"><option value="">all types</option></select></label>
<label>class<select id="fclass"><option value="">all classes</option></select></label>
<label>show<select id="fshow"><option value="">all</option><option value="todo">undecided</option><option value="done">decided</option></select></label>
<span id="saved"></span></header>
<main id="main">
<div class="panel"><img id="img" alt=""><div id="pos"></div><div id="group"></div></div>
<div class="panel"><h2 id="title"></h2><table class="kv" id="facts"></table>
<div class="actions">
<button id="keep" title="keep (k)">Keep<kbd>K</kbd></button>
<button id="drop" title="drop (d)">Drop<kbd>D</kbd></button>
<button id="relabel" title="relabel (r, then a class)">Relabel<kbd>R</kbd></button>
<button id="prev" title="previous (←)">←<kbd>P</kbd></button>
<button id="next" title="next (→)">→<kbd>N</kbd></button>
<button id="clear" title="undo the decision (u)">Undo<kbd>U</kbd></button></div>
<div id="classes"></div>
<div id="decision"></div>
<input id="note" placeholder="note (optional, saved with the next decision)" maxlength="500">
<div id="msg"></div>
<div id="keys"><kbd>K</kbd> keep · <kbd>D</kbd> drop · <kbd>R</kbd> relabel, then <kbd>0</kbd>–<kbd>9</kbd> or a click picks the class, <kbd>Enter</kbd> the suggested one, <kbd>Esc</kbd> cancels ·
<kbd>→</kbd>/<kbd>N</kbd> next · <kbd>←</kbd>/<kbd>P</kbd> previous · <kbd>U</kbd> undo · <kbd>/</kbd> note.
Each decision is saved at once to <code id="file"></code>; then <code>clean prune</code> / <code>dvc repro</code> applies them.</div>
</div>
<div id="strip" class="panel"></div>
</main>
<script type="application/json" id="data">__DATA__</script>
<script>
"use strict";
const S = JSON.parse(document.getElementById("data").textContent);
const $ = id => document.getElementById(id);
const C = S.classes, byId = new Map(S.items.map(it => [it.id, it]));
const dec = new Map(Object.entries(S.decisions).map(([k, v]) => [Number(k), v]));
window.__saveTimes = [];
let view = [], cur = 0, picking = false;
const name = i => (i === null || i === undefined) ? "—" : C[i];
const esc = s => String(s).replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;","'":"&#39;"}[c]));
const fmt = v => v === null || v === undefined ? "—" : (Math.abs(v) >= 100 ? v.toFixed(1) : v.toPrecision(3));
for (const t of S.types) $("ftype").add(new Option(t, t));
C.forEach((c, i) => $("fclass").add(new Option(c, String(i))));
$("file").textContent = S.decisions_file;
C.forEach((c, i) => { const b = document.createElement("button"); b.textContent = (i < 10 ? i + " · " : "") + c;
  b.dataset.cls = i; b.onclick = () => decide("relabel", i); $("classes").appendChild(b); });

function filter() {
  const t = $("ftype").value, c = $("fclass").value, s = $("fshow").value;
  view = S.items.filter(it => (!t || it.types.includes(t)) && (c === "" || it.label === Number(c))
    && (!s || (s === "done") === dec.has(it.id)));
  if (t) view.sort((a, b) => ((b.scores[t] ?? -Infinity) - (a.scores[t] ?? -Infinity)) || a.id - b.id);
  cur = Math.min(cur, Math.max(0, view.length - 1));
  strip(); show();
}
function progress() {
  let n = 0; for (const it of S.items) if (dec.has(it.id)) n++;
  $("progress").textContent = `${n} of ${S.total} reviewed`;
  $("bar").firstElementChild.style.width = (S.total ? 100 * n / S.total : 0) + "%";
}
function strip() {
  const f = document.createDocumentFragment();
  view.forEach((it, k) => { const a = document.createElement("a"); a.textContent = "#" + it.id; a.dataset.k = k;
    const d = dec.get(it.id); if (d) a.className = d.action; f.appendChild(a); });
  $("strip").replaceChildren(f);
}
$("strip").onclick = e => { if (e.target.dataset.k !== undefined) { cur = Number(e.target.dataset.k); show(); } };
function chip(it) {
  const k = view.indexOf(it), a = $("strip").children[k], d = dec.get(it.id);
  if (a) a.className = (d ? d.action : "") + (k === cur ? " cur" : "");
}
function mark() {
  const it = view[cur], d = it && dec.get(it.id);
  for (const a of ["keep", "drop", "relabel"]) $(a).classList.toggle("on", !!d && d.action === a);
  $("decision").innerHTML = !it ? "" : d ? `decided: <b>${esc(d.action)}</b>` + (d.action === "relabel" ? ` → ${esc(name(d.label))}` : "")
    + (d.note ? ` · <i>${esc(d.note)}</i>` : "") : "not decided yet";
  if (it) chip(it);
  progress();
}
function show() {
  picking = false; $("classes").classList.remove("open");
  for (const a of $("strip").querySelectorAll("a.cur")) a.classList.remove("cur");
  const it = view[cur];
  if (!it) { $("title").textContent = "nothing to review with these filters"; $("facts").innerHTML = ""; $("img").removeAttribute("src");
    $("pos").textContent = ""; $("group").innerHTML = ""; mark(); return; }
  $("img").src = `img/${it.id}.png`; $("img").alt = `sample ${it.id}`;
  for (const k of [1, 2]) { const n = view[cur + k]; if (n) (new Image()).src = `img/${n.id}.png`; }
  $("pos").textContent = `${cur + 1} of ${view.length} in view · ordered by ${$("ftype").value ? $("ftype").value + " score" : "issue type, then score"}`;
  $("title").textContent = `#${it.id} · ${name(it.label)}`;
  const rows = [["given label", esc(name(it.label))],
    ["suggested label", it.sug !== null && it.sug !== undefined ? `<span class="sug">${esc(name(it.sug))}</span>` + (it.sug_p !== null ? ` (p ${fmt(it.sug_p)})` : "") : "—"],
    ["issues", it.types.map(t => `<span class="tag">${esc(t)} ${fmt(it.scores[t])}</span>`).join("")]];
  for (const t of it.types) if (it.why && it.why[t]) rows.push([`why ${esc(t)}`, esc(it.why[t])]);
  if (it.rule) rows.push(["flag rule", `${esc(it.rule)} = ${fmt(it.value)}`]);
  if (it.pred !== undefined && it.pred !== null) rows.push(["model predicts", esc(name(it.pred))]);
  if (it.more) rows.push(["scores", Object.entries(it.more).map(([k, v]) => `${esc(k)} ${fmt(v)}`).join(" · ")]);
  if (it.noisy !== undefined) rows.push(["injected noise", it.noisy ? "yes" : "no"]);
  $("facts").innerHTML = rows.map(([k, v]) => `<tr><td>${k}</td><td>${v}</td></tr>`).join("");
  const g = it.group !== null && it.group !== undefined ? S.groups[String(it.group)] : null;
  $("group").innerHTML = !g ? "" : `<h3 style="font-size:14px;margin:4px 0">duplicate group ${it.group} — ${g.length} images side by side</h3><div class="members">`
    + g.map(m => `<figure class="member${m.id === it.id ? " self" : ""}${m.split !== "train" ? " eval" : ""}" style="margin:0">`
      + `<img src="img/${m.id}.png" alt="sample ${m.id}"><figcaption>#${m.id} · ${esc(name(m.label))}${m.split !== "train" ? " · " + esc(m.split) : ""}`
      + `${dec.has(m.id) ? " · " + esc(dec.get(m.id).action) : ""}</figcaption></figure>`).join("") + "</div>";
  $("note").value = (dec.get(it.id) || {}).note || "";
  history.replaceState(null, "", "#id=" + it.id);
  mark();
  const a = $("strip").children[cur], st = $("strip");  // keep the current chip in sight (the page itself never scrolls)
  if (a && (a.offsetTop < st.scrollTop || a.offsetTop > st.scrollTop + st.clientHeight - 24)) st.scrollTop = a.offsetTop - st.clientHeight / 2;
}
async function decide(action, label) {
  const it = view[cur]; if (!it) return;
  const body = {id: it.id, action: action, note: $("note").value};
  if (action === "relabel") body.label = C[label];
  if (action !== "clear" && cur < view.length - 1) { cur++; show(); }  // go on at once; the save follows
  else { picking = false; $("classes").classList.remove("open"); }
  const t0 = performance.now();
  let r, j;
  try { r = await fetch("api/decision", {method: "POST", headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
        j = await r.json(); } catch (e) { $("msg").textContent = `#${it.id} not saved: ${e}`; return; }
  const ms = performance.now() - t0;
  if (!r.ok || !j.ok) { $("msg").textContent = `#${it.id} not saved: ` + (j && j.error || r.status); return; }
  window.__saveTimes.push(ms);
  $("msg").textContent = "";
  if (j.decision) dec.set(it.id, j.decision); else dec.delete(it.id);
  $("saved").textContent = `saved #${it.id} (${ms.toFixed(0)} ms)`;
  chip(it); mark();
}
function relabel() {
  const it = view[cur]; if (!it) return;
  picking = true; $("classes").classList.add("open");
  for (const b of $("classes").children) b.classList.toggle("cur", Number(b.dataset.cls) === it.sug);
}
$("keep").onclick = () => decide("keep"); $("drop").onclick = () => decide("drop");
$("relabel").onclick = () => picking ? ($("classes").classList.remove("open"), picking = false) : relabel();
$("clear").onclick = () => decide("clear");
$("prev").onclick = () => { if (cur > 0) { cur--; show(); } };
$("next").onclick = () => { if (cur < view.length - 1) { cur++; show(); } };
for (const f of ["ftype", "fclass", "fshow"]) $(f).onchange = () => { cur = 0; filter(); };
document.addEventListener("keydown", e => {
  if (e.target === $("note")) { if (e.key === "Enter" || e.key === "Escape") $("note").blur(); return; }
  if (e.target.tagName === "SELECT" || e.ctrlKey || e.metaKey || e.altKey) return;
  const k = e.key.toLowerCase();
  if (picking) {
    if (/^[0-9]$/.test(k) && Number(k) < C.length) { e.preventDefault(); return decide("relabel", Number(k)); }
    if (k === "enter") { const it = view[cur]; if (it && it.sug !== null && it.sug !== undefined) decide("relabel", it.sug); e.preventDefault(); return; }
    if (k === "escape" || k === "r") { picking = false; $("classes").classList.remove("open"); return; }
  }
  const act = {k: () => decide("keep"), d: () => decide("drop"), r: relabel, u: () => decide("clear"),
    arrowright: () => $("next").onclick(), n: () => $("next").onclick(), arrowleft: () => $("prev").onclick(), p: () => $("prev").onclick(),
    "/": () => $("note").focus()}[k];
  if (act) { e.preventDefault(); act(); }
});
function jump() {  // #id=<id> (clean review --at, or a link): open that sample, clearing filters that hide it
  const m = /id=(\d+)/.exec(location.hash); if (!m) return false;
  let k = view.findIndex(it => it.id === Number(m[1]));
  if (k < 0 && byId.has(Number(m[1]))) { for (const f of ["ftype", "fclass", "fshow"]) $(f).value = ""; filter();
    k = view.findIndex(it => it.id === Number(m[1])); }
  if (k >= 0) { cur = k; show(); }
  return k >= 0;
}
window.addEventListener("hashchange", jump);
(function start() {
  const at = location.hash;
  filter();
  if (at) { history.replaceState(null, "", at); jump(); }
  if (!S.items.length) $("main").innerHTML = '<div class="empty panel">No flagged samples: nothing to review (run <code>clean flag</code>).</div>';
  progress();
  window.__ready = performance.now();
})();
</script></body></html>
"""
