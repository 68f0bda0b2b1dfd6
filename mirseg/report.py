"""``report.html`` of a mining run: the top images with their regions, and the pool's scores, for people.

One self-contained HTML page written by the standard library alone (string templates, no
template engine, no server, no CDN): inline CSS, a few lines of inline JS to sort the table, the
score histogram as inline SVG. Images are **relative links** to JPEG thumbnails written beside it
(``thumbs/<name>.jpg``, each linking to the full-size ``overlays/<name>.jpg``), not data URIs: a
report of 1000 images stays a ~0.5 MB page that opens at once, the thumbnails are written in the
mask pass while the overlay is in memory (so ``resume`` keeps them), and the page belongs to the
out_dir anyway (it links the masks and overlays). Open it straight from the folder (``file://``).

The page is deterministic (no clock, no random ids), so a resumed run writes the same bytes.
Once every image has loaded (or failed), the script records ``data-images-total``,
``data-images-loaded`` and ``data-images-broken`` on ``<body>``: what the headless-browser test
reads back. ``#sort=<column>`` or ``#sort=<column>-asc`` in the address sorts on opening.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import quote

import cv2
import numpy as np

from mirseg.visualize import PALETTE

THUMB_WIDTH = 320
"""Thumbnails are at most this wide (px), keeping the aspect ratio; smaller images are not enlarged."""

HISTOGRAM_BINS = 30


@dataclass(frozen=True)
class ReportImage:
    """One row of the report: an image that got a mask."""

    rank: int  # 1-based line of result.tsv
    path: str  # as listed
    score: float  # the algorithm's score (not the power-sampling priority)
    share: float  # labelled share: masked pixels / all pixels, at the original size
    mask: str  # relative to the report: masks/<name>.png
    overlay: str  # overlays/<name>.jpg
    thumb: str  # thumbs/<name>.jpg
    classes: tuple[float, ...] | None  # predicted class shares (argmax at the working size); None: no model


def thumbnail(picture: np.ndarray, width: int = THUMB_WIDTH) -> np.ndarray:
    """(H, W, 3) uint8 -> at most ``width`` wide (area interpolation, aspect kept)."""
    h, w = picture.shape[:2]
    if w <= width:
        return picture
    return cv2.resize(picture, (width, max(1, round(h * width / w))), interpolation=cv2.INTER_AREA)


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _href(relative: str) -> str:
    return html.escape(quote(relative), quote=True)


def histogram_svg(scores: Sequence[float], marked: Sequence[float] = (), bins: int = HISTOGRAM_BINS,
                  width: int = 640, height: int = 200) -> str:
    """Inline SVG histogram of ``scores``; the scores in ``marked`` (the reported images) are drawn darker."""
    s = np.asarray(scores, dtype=np.float64)
    if s.size == 0:
        return '<p class="note">No readable candidate: no scores to show.</p>'
    lo, hi = float(s.min()), float(s.max())
    if hi <= lo:
        hi = lo + 1e-9  # one value: one bar
    edges = np.linspace(lo, hi, bins + 1)
    counts, _ = np.histogram(s, edges)
    top, _ = np.histogram(np.asarray(marked, dtype=np.float64), edges)
    left, bottom, right, top_pad = 48, 28, 8, 8
    pw, ph = width - left - right, height - bottom - top_pad
    peak = max(1, int(counts.max()))
    bw = pw / bins
    parts = [f'<svg id="histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="histogram of the pool\'s scores">',
             f'<line x1="{left}" y1="{top_pad + ph}" x2="{left + pw}" y2="{top_pad + ph}" class="axis"/>',
             f'<line x1="{left}" y1="{top_pad}" x2="{left}" y2="{top_pad + ph}" class="axis"/>']
    for i, (n, m) in enumerate(zip(counts.tolist(), top.tolist())):
        x = left + i * bw
        for value, cls in ((n, "bar"), (m, "bar top")):
            if value:
                bh = ph * value / peak
                parts.append(f'<rect class="{cls}" x="{x + 0.5:.1f}" y="{top_pad + ph - bh:.1f}" '
                             f'width="{max(bw - 1, 0.5):.1f}" height="{bh:.1f}"><title>{_fmt(edges[i])} to '
                             f'{_fmt(edges[i + 1])}: {n} images ({m} reported)</title></rect>')
    parts += [f'<text x="{left}" y="{height - 8}" class="tick">{_fmt(lo)}</text>',
              f'<text x="{left + pw}" y="{height - 8}" class="tick" text-anchor="end">{_fmt(hi)}</text>',
              f'<text x="{left + pw / 2}" y="{height - 8}" class="tick" text-anchor="middle">score</text>',
              f'<text x="{left - 6}" y="{top_pad + 10}" class="tick" text-anchor="end">{peak}</text>',
              f'<text x="{left - 6}" y="{top_pad + ph}" class="tick" text-anchor="end">0</text>',
              "</svg>"]
    return "\n".join(parts)


def _colour(index: int) -> str:
    r, g, b = (int(v) for v in PALETTE[index % 256])
    return f"#{r:02x}{g:02x}{b:02x}"


def _classes_cell(shares: tuple[float, ...] | None, names: Sequence[str]) -> tuple[str, str]:
    """(sort key, cell HTML): a stacked bar of the predicted class shares and the largest three in words."""
    if shares is None:
        return "", '<td class="classes" data-key="">no model</td>'
    order = sorted(range(len(shares)), key=lambda c: (-shares[c], c))
    label = [names[c] if c < len(names) else f"class {c}" for c in range(len(shares))]
    bar = "".join(f'<span style="width:{100 * shares[c]:.2f}%;background:{_colour(c)}" '
                  f'title="{html.escape(label[c])} {100 * shares[c]:.1f}%"></span>' for c in order if shares[c] > 0)
    words = ", ".join(f"{html.escape(label[c])} {100 * shares[c]:.1f}%" for c in order[:3] if shares[c] > 0)
    key = html.escape(label[order[0]]) if order else ""
    return key, f'<td class="classes" data-key="{key}"><div class="stack">{bar}</div>{words}</td>'


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; background: #fafafa; }
h1 { font-size: 1.4em; margin: 0 0 .3em; }
dl.info { display: grid; grid-template-columns: max-content auto; gap: .15em 1em; margin: 0 0 1em; }
dl.info dt { color: #666; } dl.info dd { margin: 0; font-family: monospace; word-break: break-all; }
#histogram .bar { fill: #9db4d3; } #histogram .bar.top { fill: #2d5da1; }
#histogram .axis { stroke: #444; } #histogram .tick { font-size: 11px; fill: #444; }
table { border-collapse: collapse; background: #fff; margin-top: 1em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; vertical-align: top; text-align: left; }
th { background: #eee; cursor: pointer; user-select: none; white-space: nowrap; }
th.sorted-asc::after { content: " \\25B2"; } th.sorted-desc::after { content: " \\25BC"; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.path { font-family: monospace; font-size: .85em; max-width: 22em; word-break: break-all; }
td img { display: block; max-width: 320px; }
.stack { display: flex; width: 12em; height: .8em; border: 1px solid #999; margin-bottom: .3em; }
.stack span { display: block; height: 100%; }
.note { color: #666; }
"""

# Sorting: each row carries data-<column> keys; numbers sort as numbers. The image check below sets the
# data-images-* attributes on <body> once every <img> has finished (loaded or failed).
_SCRIPT = r"""
(function () {
  var table = document.getElementById('images'), body = table.tBodies[0];
  function sortBy(column, ascending) {
    var rows = Array.prototype.slice.call(body.rows);
    var numeric = table.querySelector('th[data-column="' + column + '"]').dataset.type === 'number';
    rows.sort(function (a, b) {
      var x = a.dataset[column], y = b.dataset[column];
      var d = numeric ? parseFloat(x) - parseFloat(y) : (x < y ? -1 : x > y ? 1 : 0);
      if (d === 0) { d = parseFloat(a.dataset.rank) - parseFloat(b.dataset.rank); return d; }
      return ascending ? d : -d;
    });
    rows.forEach(function (r) { body.appendChild(r); });
    Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
      th.classList.remove('sorted-asc', 'sorted-desc');
      if (th.dataset.column === column) { th.classList.add(ascending ? 'sorted-asc' : 'sorted-desc'); }
    });
    body.dataset.sorted = column + (ascending ? '-asc' : '-desc');
  }
  function first(column) {
    return table.querySelector('th[data-column="' + column + '"]').dataset.first === 'asc';
  }
  Array.prototype.forEach.call(table.tHead.rows[0].cells, function (th) {
    var c = th.dataset.column;
    if (!c) { return; }
    th.addEventListener('click', function () {  // again on the sorted column: the other direction
      var s = body.dataset.sorted;
      sortBy(c, s === c + '-asc' ? false : s === c + '-desc' ? true : first(c));
    });
  });
  var m = /sort=(\w+?)(-asc|-desc)?$/.exec(location.hash);
  if (m && table.querySelector('th[data-column="' + m[1] + '"]')) {
    sortBy(m[1], m[2] ? m[2] === '-asc' : first(m[1]));
  }
  function checkImages() {
    var images = Array.prototype.slice.call(document.images);
    if (images.some(function (i) { return !i.complete; })) { setTimeout(checkImages, 50); return; }
    var broken = images.filter(function (i) { return !(i.naturalWidth > 0); });
    document.body.dataset.imagesTotal = images.length;
    document.body.dataset.imagesLoaded = images.length - broken.length;
    document.body.dataset.imagesBroken = broken.map(function (i) { return i.getAttribute('src'); }).join(' ');
  }
  window.addEventListener('load', checkImages);
})();
"""


def render(images: Sequence[ReportImage], pool_scores: Sequence[float], *, title: str,
           info: Sequence[tuple[str, str]], class_names: Sequence[str]) -> str:
    """The report page as text: ``info`` (label, value) pairs, the histogram of ``pool_scores``, the image table."""
    rows = []
    for im in images:
        key, classes = _classes_cell(im.classes, class_names)
        rows.append(
            f'<tr data-rank="{im.rank}" data-score="{float(im.score)!r}" data-share="{float(im.share)!r}" '
            f'data-path="{html.escape(im.path, quote=True)}" data-classes="{key}">'
            f'<td class="num">{im.rank}</td>'
            f'<td><a href="{_href(im.overlay)}"><img src="{_href(im.thumb)}" alt="regions of '
            f'{html.escape(im.path, quote=True)}"></a></td>'
            f'<td class="path">{html.escape(im.path)}<br><a href="{_href(im.mask)}">mask</a> · '
            f'<a href="{_href(im.overlay)}">overlay</a></td>'
            f'<td class="num">{_fmt(im.score)}</td><td class="num">{100 * im.share:.2f}%</td>{classes}</tr>')
    readable = [s for s in pool_scores if math.isfinite(s)]
    info_html = "".join(f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in info)
    header = ('<tr><th data-column="rank" data-type="number" data-first="asc">#</th><th>regions</th>'
              '<th data-column="path" data-type="text" data-first="asc">image</th>'
              '<th data-column="score" data-type="number" data-first="desc">score</th>'
              '<th data-column="share" data-type="number" data-first="desc">labelled</th>'
              '<th data-column="classes" data-type="text" data-first="asc">predicted classes</th></tr>')
    table = (f'<table id="images"{"" if rows else " hidden"}><thead>{header}</thead><tbody data-sorted="rank-asc">\n'
             + "\n".join(rows) + "\n</tbody></table>" + ("" if rows else '<p class="note">No image got regions.</p>'))
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<dl class="info">{info_html}</dl>
<h2>Scores of the pool</h2>
<p class="note">{len(readable)} readable candidates; dark: the {len(images)} images below.</p>
{histogram_svg(readable, [im.score for im in images])}
<h2>Top images</h2>
<p class="note">Click a column to sort; click a picture for the full-size overlay (chosen regions tinted and
outlined, the rest dimmed). "labelled": the share of the image's pixels in its mask.</p>
{table}
<script>{_SCRIPT}</script>
</body>
</html>
"""


__all__ = ["HISTOGRAM_BINS", "THUMB_WIDTH", "ReportImage", "histogram_svg", "render", "thumbnail"]
