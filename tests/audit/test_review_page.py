"""The review page: bounded and escaped as HTML, and driven in headless Chromium (Debian's package, through
Playwright) from filtering to the downloaded decisions and reviewed lists. Screenshots are kept in
output/test-artifacts/."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from mlcls_ray.audit.review_page import review_page
from mlcls_ray.data.mlcls_format import format_line

ARTIFACTS = Path(__file__).resolve().parents[2] / "output" / "test-artifacts"
HOSTILE = "<script>alert(1)</script>"
ISSUE_TYPES = {"line": pa.int64(), "class_id": pa.int32(), "given": pa.int8(), "suggested": pa.int8(),
               "score": pa.float32(), "threshold_positive": pa.float32(), "threshold_negative": pa.float32(),
               "quality": pa.float32(), "rank": pa.int64()}


def _image(path: Path, size: tuple[int, int], color: tuple[int, int, int] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), np.uint8) if color is None \
        else np.full((size[1], size[0], 3), color, np.uint8)
    Image.fromarray(pixels).save(path)


def _issues(specs: list[tuple]) -> pa.Table:
    """Rows of issues.parquet from (path, list_file, line, class_id, class_name, kind, score, rank)."""
    cols = {k: [] for k in ("path", "list_file", "line", "class_id", "class_name", "kind", "given", "suggested",
                            "score", "threshold_positive", "threshold_negative", "pair_quality", "quality", "rank")}
    for path, list_file, line, class_id, name, kind, score, rank in specs:
        given = int(kind == "wrong")
        row = dict(path=path, list_file=list_file, line=line, class_id=class_id, class_name=name, kind=kind,
                   given=given, suggested=1 - given, score=score, threshold_positive=0.7, threshold_negative=0.2,
                   pair_quality=abs(given - score), quality=0.1 * rank, rank=rank)
        for k, v in row.items():
            cols[k].append(v)
    return pa.table({k: pa.array(v, ISSUE_TYPES.get(k, pa.float32() if k == "pair_quality" else pa.string()))
                     for k, v in cols.items()})


def _page(tmp_path: Path, kind: str, rows: pa.Table, names: list[str], **kw) -> str:
    kw = {"title": f"{kind} {HOSTILE}", "max_pixels": 10_000_000, "max_file_bytes": 50_000_000, **kw}
    return review_page(kind, rows, lambda p: str(tmp_path / p), names, **kw)


def _data(page: str) -> dict:
    return json.loads(re.search(r'<script type="application/json" id="data">(.*?)</script>', page, re.S)[1])


def test_page_is_bounded_and_escapes_user_text(tmp_path):
    """Each distinct image is one thumbnail of at most thumb_px whatever its size; an image over the pixel limit or
    not an image gets a reason instead; no path, class name or title can open a tag."""
    for name, size in (("big.png", (1500, 1000)), ("wide.png", (1200, 300)), ("huge.png", (3000, 2000))):
        _image(tmp_path / name, size)
    (tmp_path / "junk.png").write_bytes(b"not an image")
    evil_path = '<img src=x onerror=alert(3)>"&.png'
    _image(tmp_path / evil_path, (40, 40), (0, 0, 255))
    specs = [(p, "train.txt", i + 1, c, n, "missing", 0.9, i + 1) for i, p in enumerate(
        ["big.png", "wide.png", "huge.png", "junk.png", evil_path]) for c, n in ((0, "cat"), (1, HOSTILE))]
    page = _page(tmp_path, "issues", _issues(specs), ["cat", HOSTILE], max_pixels=4_000_000, thumb_px=64)

    data = _data(page)
    assert [it["class_name"] for it in data["items"][:2]] == ["cat", HOSTILE]
    assert data["items"][8]["path"] == evil_path
    assert sorted(data["images"]) == ["0", "1", "4"]  # big, wide, evil: one each for two issues apiece
    assert page.count("data:image/jpeg;base64,") == 3
    for uri in data["images"].values():
        thumb = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert thumb.format == "JPEG" and max(thumb.size) <= 64
    assert data["errors"]["2"].startswith("decompression_bomb: 3000x2000")
    assert data["errors"]["3"].startswith("not_an_image")
    assert len(page) < 60_000  # the three readable images alone are over 8 MB as files
    assert "<script>alert" not in page and "<img src=x" not in page and "<script>alert" not in data["key"]
    assert page.count("<script") == 2 and page.count("</script>") == 2
    assert "<title>issues &lt;script&gt;alert(1)&lt;/script&gt;</title>" in page


def test_page_refuses_bad_input(tmp_path):
    rows = _issues([("a.png", "train.txt", 1, 0, "cat", "missing", 0.9, 1)])
    with pytest.raises(ValueError, match="kind 'table'"):
        _page(tmp_path, "table", rows, ["cat"])
    with pytest.raises(ValueError, match=r"lack the columns \['rank'\]"):
        _page(tmp_path, "issues", rows.drop_columns(["rank"]), ["cat"])
    queue = pa.table({"path": ["/x/a.png"], "rank": [1], "uncertainty": [0.5], "label_names": [["dog"]],
                      "top_class_ids": [[0]], "top_class_names": [["cat"]], "top_scores": [[0.5]],
                      "top_thresholds": [[0.5]]})
    with pytest.raises(ValueError, match=r"label_names \['dog'\] are not among"):
        _page(tmp_path, "queue", queue, ["cat"])


@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium (``apt-get install chromium``) driven by Playwright; CI must have both."""
    executable = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if executable is None or sync_playwright is None:
        missing = "chromium (apt-get install chromium)" if executable is None else "playwright (pip install -e .[test])"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {missing} is not installed")
        pytest.skip(f"{missing} is not installed")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable)
        yield browser
        browser.close()


@pytest.fixture
def page_of(chromium):
    """Opens an HTML file in a fresh context (its own storage); page errors and dialogs fail the test."""
    contexts, problems = [], []

    def open_page(path: Path):
        context = chromium.new_context(accept_downloads=True, viewport={"width": 1100, "height": 800})
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("console", lambda msg: msg.type == "error" and problems.append(f"console: {msg.text}"))
        page.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
        page.goto(path.as_uri())
        return page

    yield open_page
    for context in contexts:
        context.close()
    assert not problems


def _download(page, name: str) -> str:
    with page.expect_download() as info:
        page.click("#download")
    assert info.value.suggested_filename == name
    return Path(info.value.path()).read_text("utf-8")


def _visible_cards(page) -> list[str]:
    return page.locator("#cards .card:visible .path").all_inner_texts()


def test_issues_page_in_chromium(tmp_path, page_of):
    """Filter by class and kind, accept two issues and reject one, download the decisions Audit.apply reads."""
    for name, color in (("a.png", (255, 0, 0)), ("b.png", (0, 255, 0)), ('c,"q".png', (0, 0, 255))):
        _image(tmp_path / "images" / name, (32, 32), color)
    _image(tmp_path / "images" / "bad.png", (32, 32))
    (tmp_path / "images" / "bad.png").write_bytes((tmp_path / "images" / "bad.png").read_bytes()[:200])  # truncated
    rows = _issues([("images/a.png", "train.txt", 1, 0, "cat", "missing", 0.91, 1),
                    ("images/a.png", "train.txt", 1, 2, HOSTILE, "wrong", 0.05, 1),
                    ("images/b.png", "train.txt", 7, 1, "dog", "missing", 0.88, 2),
                    ("images/bad.png", "train.txt", 9, 0, "cat", "wrong", 0.1, 3),
                    ('images/c,"q".png', "val.txt", 2, 3, "bird", "missing", 0.75, 4)])
    html_file = tmp_path / "review.html"
    html_file.write_text(_page(tmp_path, "issues", rows, ["cat", "dog", HOSTILE, "bird"]), "utf-8")
    page = page_of(html_file)

    cards = page.locator("#cards .card")
    assert cards.count() == 5
    assert cards.nth(1).locator(".class").inner_text() == HOSTILE  # shown as text, never run
    assert page.locator("img.thumb").count() == 4
    assert page.locator("div.thumb").inner_text().startswith("no preview: corrupt_image")
    assert page.title() == f"issues {HOSTILE}"

    page.select_option("#class-filter", "cat")
    assert _visible_cards(page) == ["images/a.png", "images/bad.png"]
    page.select_option("#kind-filter", "missing")
    assert _visible_cards(page) == ["images/a.png"]
    page.select_option("#class-filter", "")
    assert _visible_cards(page) == ["images/a.png", "images/b.png", 'images/c,"q".png']
    page.select_option("#kind-filter", "")

    cards.nth(0).locator("button.accept").click()
    cards.nth(4).locator("button.accept").click()
    cards.nth(1).locator("button.reject").click()
    cards.nth(2).locator("button.accept").click()
    cards.nth(2).locator("button.accept").click()  # a second click takes the decision back
    assert cards.nth(0).get_attribute("class") == "card accepted"
    assert cards.nth(1).locator("button.reject").get_attribute("aria-pressed") == "true"
    assert page.inner_text("#counter") == "5 shown of 5 · 2 accepted · 1 rejected"
    page.select_option("#state-filter", "undecided")
    assert _visible_cards(page) == ["images/b.png", "images/bad.png"]
    page.select_option("#state-filter", "")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "review_page.png"), full_page=True)

    assert _download(page, "audit_decisions.csv") == (
        "path,list_file,line,class_id,class_name,kind,given,suggested,accept\n"
        "images/a.png,train.txt,1,0,cat,missing,0,1,true\n"
        f"images/a.png,train.txt,1,2,{HOSTILE},wrong,1,0,false\n"
        '"images/c,""q"".png",val.txt,2,3,bird,missing,0,1,true\n')
    page.reload()  # decisions outlive a reload (kept in the browser's storage for this page)
    assert page.inner_text("#counter") == "5 shown of 5 · 2 accepted · 1 rejected"


def test_queue_page_in_chromium(tmp_path, page_of):
    """Check and uncheck classes (one through the class picker), mark images reviewed, download reviewed.txt."""
    root = tmp_path / "bucket"
    _image(root / "day1" / "q1.png", (32, 24), (200, 100, 0))
    _image(root / "q2.png", (24, 32), (0, 100, 200))
    names = ["cat", "dog", HOSTILE, "bird"] + [f"c{i}" for i in range(4, 45)]  # over 40: top classes + a picker
    rows = pa.table({
        "path": [str(root / "day1" / "q1.png"), str(root / "q2.png"), str(tmp_path / "elsewhere" / "q3.png")],
        "rank": pa.array([1, 2, 3], pa.int64()),
        "uncertainty": pa.array([0.9, 0.8, 0.7], pa.float32()),
        "label_names": [["cat"], ["dog", HOSTILE], []],
        "top_class_ids": pa.array([[0, 1], [1, 2], [5, 6]], pa.list_(pa.int32())),
        "top_class_names": [["cat", "dog"], ["dog", HOSTILE], ["c5", "c6"]],
        "top_scores": pa.array([[0.6, 0.4], [0.52, 0.49], [0.3, 0.2]], pa.list_(pa.float32())),
        "top_thresholds": pa.array([[0.5, 0.5], [0.5, 0.5], [0.4, 0.4]], pa.list_(pa.float32())),
    })
    html_file = tmp_path / "review.html"
    html_file.write_text(review_page("queue", rows, lambda p: p, names, title="queue", max_pixels=10_000_000,
                                     max_file_bytes=50_000_000, queue_root=str(root)), "utf-8")
    page = page_of(html_file)

    cards = page.locator("#cards .card")
    assert cards.count() == 3
    assert page.locator("#kind-box").is_hidden()
    assert cards.nth(2).locator("div.thumb").inner_text().startswith("no preview: missing_image")
    second = cards.nth(1)
    assert second.locator(".class-box:checked").count() == 2
    assert [t.strip() for t in second.locator(".classes label").all_inner_texts()] == ["dog", HOSTILE]
    page.select_option("#class-filter", "cat")
    assert _visible_cards(page) == [str(root / "day1" / "q1.png")]
    page.select_option("#class-filter", "")

    cards.nth(0).locator(".actions input[type=checkbox]").check()
    second.locator('.class-box[data-class-id="1"]').uncheck()  # a change marks the image reviewed
    second.locator("input[list=class-names]").fill("bird")
    second.locator("input[list=class-names]").dispatch_event("change")
    assert second.locator('.class-box[data-class-id="3"]').is_checked()
    assert page.inner_text("#counter") == "3 shown of 3 · 2 reviewed"
    page.screenshot(path=str(ARTIFACTS / "review_queue.png"), full_page=True)

    expected = [format_line("images/day1/q1.png", [1] + [0] * 44),
                format_line("images/q2.png", [0, 0, 1, 1] + [0] * 41)]
    assert _download(page, "reviewed.txt") == "".join(line + "\n" for line in expected)
