"""report.html of `mirseg mine ... report=true`: its content parsed here, and the page opened in headless Chromium."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from mirseg.config import MineConfig, build_config
from mirseg.mine import mine
from mirseg.report import ReportImage, histogram_svg, render, thumbnail

CHROMIUM_HINT = ("headless Chromium is needed for this test and was not found on PATH: install Debian's package "
                 "with `apt-get update && apt-get install -y chromium` (.ci/run does this), or set CHROMIUM=/path")


class _Page(HTMLParser):
    """The parts of the page the tests look at: every tag's attributes, the table rows, the histogram bars."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, {k: v or "" for k, v in attrs}))

    def all(self, tag: str) -> list[dict[str, str]]:
        return [a for t, a in self.tags if t == tag]

    @property
    def rows(self) -> list[dict[str, str]]:
        return [a for a in self.all("tr") if "data-rank" in a]


@pytest.fixture(scope="module")
def report_pool(trained_fastscnn, tmp_path_factory):
    """The 8 validation images of the toy model and a corrupt file."""
    root = tmp_path_factory.mktemp("report_pool")
    shutil.copytree(trained_fastscnn[2].images, root / "images")
    (root / "images" / "corrupt.png").write_bytes(b"not a png")
    return root / "images"


def _mine(ckpt: Path, images: Path, out: Path, **extra):
    return mine(build_config(MineConfig, dict(checkpoint=str(ckpt), images=str(images), out_dir=str(out),
                                              workers_per_gpu=0, report=True, max_superpixel_per_image=128,
                                              max_kept_mining_image=4, **extra)))


def _check_offline(page: _Page, folder: Path) -> None:
    """Nothing is fetched from a server: no external link, stylesheet or script; every src is a file in folder."""
    assert not page.all("link") and all("src" not in a for a in page.all("script"))
    for attrs in page.all("img") + page.all("a"):
        ref = attrs.get("src") or attrs.get("href")
        assert ref and not re.match(r"^[a-z]+:|^//", ref), ref  # relative: no http(s):, file:, data:, //host
        assert (folder / ref).is_file(), ref


def test_mine_report_shows_the_top_images_offline(trained_fastscnn, report_pool, tmp_path):
    out = tmp_path / "mine"
    result = _mine(trained_fastscnn[0], report_pool, out, region_budget=0.05)
    assert (out / "masks.tsv").is_file()  # report implies save_masks
    text = (out / "report.html").read_text()
    page = _Page(text)
    _check_offline(page, out)
    masks = [line.split("\t") for line in (out / "masks.tsv").read_text().splitlines()]
    rows = page.rows
    # The top 4 in ranking order, each with its score, labelled share and thumbnail.
    assert [r["data-path"] for r in rows] == [p for p, _ in result.ranking[:4]] == [m[0] for m in masks]
    assert [int(r["data-rank"]) for r in rows] == [1, 2, 3, 4]
    assert [float(r["data-score"]) for r in rows] == pytest.approx([s for _, s in result.ranking[:4]])
    assert [float(r["data-share"]) for r in rows] == pytest.approx([float(m[3]) for m in masks], abs=1e-6)
    thumbs = [a["src"] for a in page.all("img")]
    assert thumbs == [f"thumbs/{Path(m[1]).stem}.jpg" for m in masks]
    # Predicted class shares by name; the dominant class is the sort key.
    assert all(r["data-classes"] in ("background", "disc", "box") for r in rows)
    assert re.search(r"background \d+\.\d%", text)
    # The histogram counts every readable candidate once (8; the corrupt one has no score), 4 of them dark.
    titles = re.findall(r'<rect class="bar"[^>]*><title>[^<]*: (\d+) images \((\d+) reported\)', text)
    assert sum(int(n) for n, _ in titles) == 8 and sum(int(m) for _, m in titles) == 4
    assert "9 (1 unreadable, ranked last)" in text


def test_report_of_random_needs_no_model(report_pool, tmp_path):
    out = tmp_path / "random"
    mine(build_config(MineConfig, dict(images=str(report_pool), out_dir=str(out), mining_algorithm="random",
                                       report=True, max_kept_mining_image=2, max_superpixel_per_image=128)))
    page = _Page((out / "report.html").read_text())
    _check_offline(page, out)
    assert len(page.rows) == 2 and "no model" in (out / "report.html").read_text()


def test_render_escapes_and_handles_an_empty_report():
    im = ReportImage(1, 'a<b>&"c".png', 0.5, 0.02, "masks/a.png", "overlays/a b.jpg", "thumbs/a b.jpg",
                     (0.75, 0.25))
    text = render([im], [0.5, 0.1], title="t <x>", info=[("k", "<v>")], class_names=["road", "car"])
    assert "a&lt;b&gt;&amp;&quot;c&quot;.png" in text and 'a<b>' not in text and "&lt;v&gt;" in text
    assert 'src="thumbs/a%20b.jpg"' in text and "road 75.0%, car 25.0%" in text
    empty = render([], [], title="t", info=[], class_names=[])
    assert "No image got regions" in empty and "No readable candidate" in empty and _Page(empty).rows == []
    svg = histogram_svg([1.0, 1.0, 1.0])  # a single value: one bar of 3
    assert svg.count('<rect class="bar"') == 1 and ": 3 images" in svg


def test_thumbnails_keep_the_aspect_and_never_enlarge():
    big = np.zeros((300, 640, 3), np.uint8)
    assert thumbnail(big).shape == (150, 320, 3)
    small = np.zeros((20, 30, 3), np.uint8)
    assert thumbnail(small) is small


def _chromium() -> str:
    """The browser's path; a missing browser FAILS the test (with how to install it), it is not skipped."""
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail(CHROMIUM_HINT)
    return found


def _dump_dom(browser: str, url: str) -> str:
    """The DOM after the page's scripts ran (virtual time: the load event and the image check are done)."""
    with tempfile.TemporaryDirectory(prefix="mirseg-chromium-") as profile:
        proc = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", f"--user-data-dir={profile}",
                               "--virtual-time-budget=10000", "--dump-dom", url],
                              capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


@pytest.mark.slow  # starts a browser (a few seconds) and needs Debian's chromium, which .ci/run installs
def test_report_renders_in_headless_chromium_with_every_image(request, tmp_path):
    browser = _chromium()  # before the fixtures: a missing browser fails at once, not after training a model
    trained, pool = request.getfixturevalue("trained_fastscnn"), request.getfixturevalue("report_pool")
    out = tmp_path / "mine"
    _mine(trained[0], pool, out)
    report = out / "report.html"
    body = _Page(_dump_dom(browser, report.as_uri())).all("body")[0]
    assert body.get("data-images-total") == "4", body  # the script ran and saw the 4 thumbnails ...
    assert body.get("data-images-loaded") == "4" and body.get("data-images-broken") == "", body  # ... all decoded

    # The sorting script: #sort=share-asc orders the rows by labelled share, smallest first.
    dom = _Page(_dump_dom(browser, report.as_uri() + "#sort=share-asc"))
    shares = [float(r["data-share"]) for r in dom.rows]
    assert shares == sorted(shares) and [a for a in dom.all("tbody")][0]["data-sorted"] == "share-asc"

    # The check can fail: a missing thumbnail is reported as broken.
    gone = sorted((out / "thumbs").iterdir())[0]
    gone.unlink()
    body = _Page(_dump_dom(browser, report.as_uri())).all("body")[0]
    assert body.get("data-images-loaded") == "3" and body.get("data-images-broken") == f"thumbs/{gone.name}", body
