"""`clean review` and the decisions it writes: prune applies them on top of any strategy, the
server refuses what it must, and the page works in a real headless browser (Chromium from the
Debian packages, driven by selenium through /usr/bin/chromedriver — nothing is downloaded)."""
from __future__ import annotations

import http.client
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.config import PrepareConfig, PruneConfig
from pipeline.data.dataset import load_split
from pipeline.decisions import HEADER, apply_decisions, read_decisions
from pipeline.errors import CleanError
from pipeline.formats.manifest import read_manifest
from pipeline.stages.prepare import prepare
from pipeline.stages.prune import prune
from pipeline.views.review import Review, serve, url

from .helpers import make_imagefolder

CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]


def project(root: Path, n_per_class: int = 12, n_flag: int | None = None, noise: float = 0.0) -> dict:
    """A tiny project: imagefolder → data/manifest.csv, scores/scores.csv and scores/flags.csv
    (label issues with suggested labels, one duplicate group with a test-split member in
    issues.json). n_flag: how many training samples are flagged (None = every third)."""
    make_imagefolder(root / "imgs", n_per_class=n_per_class)
    prepare(root / "data",
            PrepareConfig(source="imagefolder", root=str(root / "imgs"), val_frac=0.1, test_frac=0.2, seed=0,
                          noise_rate=noise))
    m = read_manifest(root / "data/manifest.csv")
    tr = m[m["split"] == "train"].reset_index(drop=True)
    n = len(tr)
    rng = np.random.default_rng(0)
    loss = rng.random(n)
    (root / "scores").mkdir(exist_ok=True)
    sc = pd.DataFrame({"id": tr["id"], "path": tr["path"], "label": tr["label"], "pred": (tr["label"] + 1) % 3,
                       "loss": loss, "grad_norm": loss + 1, "aum": -loss})
    if noise:
        sc["orig_label"], sc["noisy"] = tr["orig_label"], tr["noisy"]
    sc.to_csv(root / "scores/scores.csv", index=False)
    flagged = np.zeros(n, bool)
    if n_flag is None:
        flagged[::3] = True
    else:
        flagged[:n_flag] = True
    dup_group = np.full(n, -1)
    dup_group[[1, 2]] = 0                       # train ids 1 and 2 copy each other (2 is flagged)
    is_dup = np.zeros(n, bool)
    is_dup[2] = True
    fl = pd.DataFrame({"id": tr["id"], "flagged": flagged.astype(int), "rule": "quantile loss > 0.5",
                       "value": loss, "is_label": flagged.astype(int), "label_score": np.round(loss, 6),
                       "is_duplicate": is_dup.astype(int), "duplicate_score": np.where(dup_group >= 0, 0.99, 0.1),
                       "suggested_label": (tr["label"] + 1) % 3, "suggested_p": 0.8, "duplicate_group": dup_group})
    fl.to_csv(root / "scores/flags.csv", index=False)
    test_id = int(m[m["split"] == "test"]["id"].iloc[0])
    (root / "scores/issues.json").write_text(json.dumps({"duplicate": {"examples": [
        {"group": 0, "train_ids": [int(tr["id"][1]), int(tr["id"][2])], "eval_ids": [test_id], "labels": [0]}]}}))
    return {"root": root, "train": tr, "flags": fl, "test_id": test_id, "manifest": m}


def run_prune(root: Path, strategy="drop-flagged", decisions=True):
    return prune(root / "data/manifest.csv", root / "scores/scores.csv", root / "data/pruned.csv",
                 root / "prune/summary.json", PruneConfig(strategy=strategy, by="loss", keep=0.5),
                 flags_csv=root / "scores/flags.csv", decisions=root / "data/decisions.csv" if decisions else None)


def write_decisions(root: Path, rows) -> Path:
    """rows (id, action, label, note) → data/decisions.csv, each with its image's manifest path."""
    p = root / "data/decisions.csv"
    m = pd.read_csv(root / "data/manifest.csv", keep_default_na=False)
    paths = dict(zip(m["id"], m["path"]))
    pd.DataFrame([(i, paths.get(i, ""), *r) for i, *r in rows], columns=HEADER).to_csv(p, index=False)
    return p


# --------------------------------------------------------------------------- prune applies decisions


def test_prune_applies_decisions_on_top_of_the_strategy(tmp_path):
    P = project(tmp_path)
    tr, fl = P["train"], P["flags"]
    ids = tr["id"].to_numpy()
    flagged = fl["flagged"].to_numpy(bool)
    f_ids, ok_ids = ids[flagged], ids[~flagged]
    keep_back, relabel_back, drop_ok = int(f_ids[0]), int(f_ids[1]), int(ok_ids[0])
    relabel_ok = int(ok_ids[1])
    old = dict(zip(tr["id"], tr["label"]))
    new_lab = (old[relabel_back] + 1) % 3
    write_decisions(tmp_path, [(keep_back, "keep", "", "fine"), (relabel_back, "relabel", "abc"[new_lab], ""),
                               (drop_ok, "drop", "", "blurry"), (relabel_ok, "relabel", str((old[relabel_ok] + 2) % 3), "")])
    s = run_prune(tmp_path)
    out = pd.read_csv(tmp_path / "data/pruned.csv")
    kept = set(out[out["split"] == "train"]["id"])
    # the strategy dropped the flagged ones; a person's decision wins either way
    assert kept == (set(ok_ids) - {drop_ok}) | {keep_back, relabel_back}
    o = out.set_index("id")
    assert o.loc[relabel_back, "label"] == new_lab and o.loc[relabel_back, "orig_label"] == old[relabel_back]
    assert o.loc[relabel_ok, "label"] == (old[relabel_ok] + 2) % 3 and o.loc[relabel_ok, "orig_label"] == old[relabel_ok]
    same = o.drop(index=[relabel_back, relabel_ok])
    assert (same["label"] == same["orig_label"]).all()
    full = P["manifest"]
    assert len(out[out["split"] != "train"]) == len(full[full["split"] != "train"])  # val/test untouched
    assert s["n_decisions"] == 4 and s["n_review_dropped"] == 1 and s["n_relabeled"] == 2
    assert s["n_review_kept"] == 1 and s["n_review_overrode"] == 3
    assert s["n_kept"] == len(kept) and s["decisions"].endswith("decisions.csv")
    # retrain reads the pruned manifest's `label`: it trains on the overridden labels
    split = load_split(tmp_path / "data/pruned.csv", "train")
    got = dict(zip(split.ids.tolist(), split.labels.tolist()))
    assert got[relabel_back] == new_lab and got[relabel_ok] == (old[relabel_ok] + 2) % 3
    # no file / header only: the strategy alone, no orig_label column added
    write_decisions(tmp_path, [])
    s = run_prune(tmp_path)
    out = pd.read_csv(tmp_path / "data/pruned.csv")
    assert set(out[out["split"] == "train"]["id"]) == set(ok_ids) and "orig_label" not in out.columns
    assert s["decisions"] is None
    (tmp_path / "data/decisions.csv").unlink()
    run_prune(tmp_path)
    # with any strategy: max-gradient keeps the top half by loss; the decisions still win
    write_decisions(tmp_path, [(int(ids[0]), "drop", "", ""), (int(ids[1]), "keep", "", "")])
    run_prune(tmp_path, strategy="max-gradient")
    kept = set(pd.read_csv(tmp_path / "data/pruned.csv").query("split == 'train'")["id"])
    assert int(ids[0]) not in kept and int(ids[1]) in kept


def test_relabel_with_injected_noise_keeps_orig_label_the_source_label(tmp_path):
    P = project(tmp_path, noise=0.3)
    tr = P["train"]
    noisy = tr[tr["noisy"] == 1]
    a, b = int(noisy["id"].iloc[0]), int(noisy["id"].iloc[1])
    truth_a = int(noisy["orig_label"].iloc[0])
    wrong_b = next(c for c in range(3) if c not in (int(noisy["label"].iloc[1]), int(noisy["orig_label"].iloc[1])))
    write_decisions(tmp_path, [(a, "relabel", "abc"[truth_a], "back to the truth"), (b, "relabel", "abc"[wrong_b], "")])
    s = run_prune(tmp_path, strategy="max-gradient")
    o = pd.read_csv(tmp_path / "data/pruned.csv").set_index("id")
    assert o.loc[a, "label"] == truth_a and o.loc[a, "orig_label"] == truth_a   # orig_label = the source's label
    assert o.loc[b, "label"] == wrong_b and o.loc[b, "orig_label"] == int(noisy["orig_label"].iloc[1])
    assert o.loc[a, "noisy"] == 1                                                # noisy = noise was injected here
    assert s["n_relabeled"] == 2 and s["n_relabeled_to_truth"] == 1


@pytest.mark.parametrize("rows, match", [
    ([(10**9, "keep", "", "")], r"id 1000000000 is not a training sample"),
    ([("x", "keep", "", "")], r"row 2: id must be an integer"),
    ([(0, "delete", "", "")], r"action 'delete' is not one of keep, drop, relabel"),
    ([(0, "relabel", "zebra", "")], r"relabel to 'zebra', which is not a class"),
])
def test_bad_decisions_are_refused_by_prune(tmp_path, rows, match):
    P = project(tmp_path)
    rows = [(int(P["train"]["id"].iloc[0]) if r[0] == 0 else r[0], *r[1:]) for r in rows]
    write_decisions(tmp_path, rows)
    with pytest.raises(CleanError, match=match):
        run_prune(tmp_path)
    assert not (tmp_path / "data/pruned.csv").exists()


def test_decisions_for_test_ids_are_left_to_evaluate(tmp_path):
    """A reviewed test image is evaluate's (accuracy_reviewed): prune keeps every val/test row as it was."""
    import pandas as pd

    P = project(tmp_path)
    write_decisions(tmp_path, [(P["test_id"], "drop", "", "")])
    s = run_prune(tmp_path)
    before, after = pd.read_csv(tmp_path / "data/manifest.csv"), pd.read_csv(tmp_path / "data/pruned.csv")
    pd.testing.assert_frame_equal(before[before["split"] != "train"].reset_index(drop=True),
                                  after[after["split"] != "train"].reset_index(drop=True))
    assert s["decisions"] is None  # no training decision


def test_apply_decisions_unit():
    kept, labels, facts = apply_decisions([5, 6, 7], [0, 1, 2], [True, False, True],
                                          {5: {"action": "drop", "label": None}, 6: {"action": "relabel", "label": 2},
                                           7: {"action": "keep", "label": None}})
    assert kept.tolist() == [False, True, True] and labels.tolist() == [0, 2, 2]
    assert facts == {"n_decisions": 3, "n_review_dropped": 1, "n_review_kept": 1, "n_relabeled": 1, "n_review_overrode": 2}


# --------------------------------------------------------------------------- server refusals


def request(server, method: str, path: str, body=None, headers=None):
    port = server.server_address[1]
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    h = {"Host": f"127.0.0.1:{port}", **(headers or {})}
    data = None
    if body is not None:
        data = json.dumps(body).encode() if not isinstance(body, bytes) else body
        h.setdefault("Content-Type", "application/json")
    c.request(method, path, body=data, headers=h)
    r = c.getresponse()
    out = r.status, r.read().decode("utf-8", "replace"), dict(r.getheaders())
    c.close()
    return out


@pytest.fixture
def served(tmp_path):
    P = project(tmp_path)
    (tmp_path / "secret.txt").write_text("not for the browser")
    r = Review(tmp_path / "data/manifest.csv", tmp_path / "scores/flags.csv", tmp_path / "data/decisions.csv",
               tmp_path / "scores/scores.csv")
    server = serve(r, 0)
    yield P, r, server
    server.shutdown()
    server.server_close()


def test_server_refuses_what_it_must_and_changes_nothing(served):
    P, r, server = served
    t = r.token
    dec = r.decisions_csv
    assert dec.read_text() == "id,path,action,label,note\n"   # created with its header
    before = dec.read_bytes()
    first = int(r.items[0]["id"])
    # the page and a manifest image are served (with the token, only on 127.0.0.1)
    st, body, h = request(server, "GET", f"/{t}/")
    assert st == 200 and "clean review" in body and h["Content-Type"].startswith("text/html")
    assert "default-src 'none'" in h["Content-Security-Policy"] and h["Referrer-Policy"] == "no-referrer"
    st, _, h = request(server, "GET", f"/{t}/img/{P['test_id']}.png")
    assert st == 200 and h["Content-Type"] == "image/png"
    assert server.server_address[0] == "127.0.0.1"
    # without the token, or with another: 403
    other = t[:-1] + ("A" if t[-1] != "A" else "B")
    for path in ("/", f"/img/{first}.png", "/api/state", f"/{other}/", f"/{t}x/img/{first}.png", f"/{other}/api/state"):
        st, body, _ = request(server, "GET", path)
        assert st == 403 and "missing or wrong token" in body, path
    st, body, _ = request(server, "POST", "/api/decision", {"id": first, "action": "drop"})
    assert st == 403 and "token" in body
    # paths outside the manifest's images, directory listings, other files: 404 with a message
    for path in (f"/{t}/img/../../secret.txt", f"/{t}/../secret.txt", f"/{t}/img/..%2f..%2fsecret.txt",
                 f"/{t}/secret.txt", f"/{t}/data/manifest.csv", f"/{t}/img/", f"/{t}/img", f"/{t}/imgs/a/000.png",
                 f"/{t}/img/999999.png", f"/{t}/img/{first}.png/../../../etc/passwd", f"/{t}/img//etc/passwd"):
        st, body, _ = request(server, "GET", path)
        assert st == 404 and "not found" in body and "not for the browser" not in body, (path, st, body)
    # another Host (DNS rebinding) or a foreign Origin: 403
    st, body, _ = request(server, "GET", f"/{t}/", headers={"Host": "evil.example:80"})
    assert st == 403 and "Host" in body
    st, body, _ = request(server, "POST", f"/{t}/api/decision", {"id": first, "action": "drop"},
                          headers={"Origin": "http://evil.example"})
    assert st == 403 and "Origin" in body
    # decisions for an unknown id / class / action: 400 + message
    for d, msg in (({"id": 999999, "action": "drop"}, "unknown id 999999"),
                   ({"id": P["test_id"], "action": "drop"}, f"unknown id {P['test_id']}"),
                   ({"id": "1; rm -rf /", "action": "drop"}, "unknown id"),
                   ({"id": first, "action": "relabel", "label": "zebra"}, "unknown class 'zebra'"),
                   ({"id": first, "action": "relabel", "label": 7}, "unknown class 7"),
                   ({"id": first, "action": "delete"}, "unknown action 'delete'"),
                   ([1, 2], "a decision is a JSON object")):
        st, body, _ = request(server, "POST", f"/{t}/api/decision", d)
        assert st == 400 and msg in json.loads(body)["error"], (d, body)
    st, body, _ = request(server, "POST", f"/{t}/api/decision", b"not json")
    assert st == 400 and "valid JSON" in body
    st, body, _ = request(server, "POST", f"/{t}/api/decision", b"x" * 20000)
    assert st == 400
    assert dec.read_bytes() == before and r.decisions == {}   # nothing changed
    # a good decision is saved at once
    st, body, _ = request(server, "POST", f"/{t}/api/decision", {"id": first, "action": "relabel", "label": "c"})
    assert st == 200 and json.loads(body)["reviewed"] == 1
    assert read_decisions(dec, ["a", "b", "c"], r.paths) == {first: {"action": "relabel", "label": 2, "note": ""}}


# --------------------------------------------------------------------------- the page in a browser


def browser(width: int, height: int):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
              f"--window-size={width},{height}", "--hide-scrollbars"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=opts)


def wait_for(fn, timeout=10.0, what="condition"):
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        v = fn()
        if v:
            return v
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.skipif(not os.path.exists(CHROMEDRIVER),
                    reason=f"{CHROMEDRIVER} absent: install the Debian packages chromium and chromium-driver")
def test_review_in_a_headless_browser(tmp_path):
    pytest.importorskip("selenium", reason="selenium not installed: pip install -e '.[test]'")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    P = project(tmp_path, n_per_class=260, n_flag=500)   # 500 flagged samples (label issues, 1 duplicate)
    r = Review(tmp_path / "data/manifest.csv", tmp_path / "scores/flags.csv", tmp_path / "data/decisions.csv",
               tmp_path / "scores/scores.csv")
    assert len(r.items) == 500
    server = serve(r, 0)
    drv = browser(1280, 900)
    try:
        body = lambda: drv.find_element(By.TAG_NAME, "body")  # noqa: E731
        saves = lambda: drv.execute_script("return window.__saveTimes.length")  # noqa: E731
        t0 = time.perf_counter()
        drv.get(url(server))
        wait_for(lambda: drv.execute_script("return window.__ready !== undefined"), what="the page")
        load_s = time.perf_counter() - t0
        nav = drv.execute_script("const t = performance.timing; return t.loadEventEnd - t.navigationStart;") / 1000
        assert drv.find_element(By.ID, "progress").text == "0 of 500 reviewed"
        items = [it["id"] for it in r.items]
        assert drv.find_element(By.ID, "title").text.startswith(f"#{items[0]} ")
        wait_for(lambda: drv.execute_script("const i = document.getElementById('img'); return i.complete && i.naturalWidth > 0"),
                 what="the image")
        assert drv.find_element(By.ID, "img").size["width"] >= 300           # large enough to judge
        facts = drv.find_element(By.ID, "facts").text
        assert "given label" in facts and "suggested label" in facts and "label" in facts and "quantile loss" in facts
        # by clicks: keep #0; by keys: drop #1, relabel #2 to class 1 ('b'); by click: relabel #3 to 'c'
        drv.find_element(By.ID, "keep").click()
        wait_for(lambda: saves() == 1, what="save 1")
        body().send_keys("d")
        wait_for(lambda: saves() == 2, what="save 2")
        body().send_keys("r")
        body().send_keys("1")
        wait_for(lambda: saves() == 3, what="save 3")
        drv.find_element(By.ID, "relabel").click()
        drv.find_element(By.CSS_SELECTOR, "#classes button[data-cls='2']").click()
        wait_for(lambda: saves() == 4, what="save 4")
        assert drv.find_element(By.ID, "progress").text == "4 of 500 reviewed"
        # previous / next by keys, and the decision shown
        body().send_keys("p")
        assert "relabel → c" in drv.find_element(By.ID, "decision").text.lower()
        body().send_keys("n")
        assert drv.find_element(By.ID, "decision").text == "not decided yet"
        # many decisions by key, for timing (keep, drop alternately)
        for k in range(40):
            body().send_keys("kd"[k % 2])
            wait_for(lambda: saves() == 5 + k, what=f"save {5 + k}")
        times = drv.execute_script("return window.__saveTimes")
        on_disk = read_decisions(tmp_path / "data/decisions.csv", r.classes, r.paths)
        assert len(on_disk) == 44
        # reload: the decisions are kept, and shown
        drv.refresh()
        wait_for(lambda: drv.execute_script("return window.__ready !== undefined"), what="the reloaded page")
        assert drv.find_element(By.ID, "progress").text == "44 of 500 reviewed"
        chips = drv.find_elements(By.CSS_SELECTOR, "#strip a")
        assert [c.get_attribute("class").split()[0] for c in chips[:4]] == ["keep", "drop", "relabel", "relabel"]
        drv.get(url(server, items[2]))
        drv.refresh()
        wait_for(lambda: drv.execute_script("return window.__ready !== undefined"), what="the page at an id")
        assert drv.find_element(By.ID, "title").text.startswith(f"#{items[2]} ")
        assert "relabel → b" in drv.find_element(By.ID, "decision").text.lower()
        # undo by key
        body().send_keys("u")
        wait_for(lambda: "not decided" in drv.find_element(By.ID, "decision").text, what="undo")
        assert drv.find_element(By.ID, "progress").text == "43 of 500 reviewed"
        body().send_keys("r")
        body().send_keys("1")
        wait_for(lambda: drv.find_element(By.ID, "progress").text == "44 of 500 reviewed", what="redo")
        # filters: duplicates show the group side by side (train copies and the test copy)
        Select(drv.find_element(By.ID, "ftype")).select_by_value("duplicate")
        assert drv.find_element(By.ID, "pos").text.startswith("1 of 1 in view")
        members = drv.find_elements(By.CSS_SELECTOR, "#group .member")
        assert len(members) == 3 and "test" in members[-1].text
        wait_for(lambda: drv.execute_script("return [...document.querySelectorAll('#group img')].every(i => i.complete && i.naturalWidth > 0)"),
                 what="the group's images")
        shots = Path(os.environ.get("CLEAN_REVIEW_SHOTS", tmp_path))
        shots.mkdir(parents=True, exist_ok=True)
        drv.save_screenshot(str(shots / "review_desktop.png"))
        Select(drv.find_element(By.ID, "ftype")).select_by_value("")
        Select(drv.find_element(By.ID, "fclass")).select_by_value("1")
        n_b = sum(1 for it in r.items if it["label"] == 1)
        assert drv.find_element(By.ID, "pos").text.startswith(f"1 of {n_b} in view")
        drv.set_window_size(420, 900)
        Select(drv.find_element(By.ID, "fclass")).select_by_value("")
        Select(drv.find_element(By.ID, "ftype")).select_by_value("duplicate")
        time.sleep(0.2)
        drv.save_screenshot(str(shots / "review_narrow.png"))
        assert drv.find_element(By.ID, "progress").is_displayed()
    finally:
        drv.quit()
        server.shutdown()
        server.server_close()
    med, worst = float(np.median(times)), float(np.max(times))
    print(f"\nreview of 500 flagged samples: page load {load_s * 1000:.0f} ms (navigation {nav * 1000:.0f} ms); "
          f"decision save median {med:.1f} ms, max {worst:.1f} ms over {len(times)} decisions")
    assert load_s <= 2.0, f"page load {load_s:.2f} s > 2 s"
    assert med <= 100 and worst <= 500, f"decision save median {med:.1f} ms, max {worst:.1f} ms"
    # prune applies them: the reviewed dataset version
    s = run_prune(tmp_path)
    out = pd.read_csv(tmp_path / "data/pruned.csv").set_index("id")
    assert s["n_decisions"] == 44
    assert items[0] in out.index and items[1] not in out.index           # kept (though flagged) / dropped
    assert out.loc[items[2], "label"] == 1 and out.loc[items[3], "label"] == 2
    assert out.loc[items[2], "orig_label"] == P["train"].set_index("id").loc[items[2], "label"]

