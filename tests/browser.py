"""A real browser for the tests: headless Chromium with no network, and what it drew.

``render(page)`` opens a page in headless Chromium (Debian's ``chromium``; ``.ci/run`` installs it) with every
host name unresolvable, so nothing can come from a CDN, lets its scripts run, and returns the DOM as the page
left it. ``charts(dom)`` finds the charts in it: each top-level ``<svg>`` with the marks that carry data
(Vega: the elements of its ``role-mark`` groups; matplotlib: the clipped artists inside its axes), so an
empty chart, a chart whose script never ran and a page whose libraries never loaded all count as drawing nothing.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

import pytest

CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")

SHAPES = {"path", "rect", "circle", "ellipse", "line", "polyline", "polygon", "use"}


def chromium() -> str:
    """The Chromium binary, or skip the test (with how to get one)."""
    for path in (*CHROMIUM_PATHS, shutil.which("chromium") or ""):
        if path and Path(path).is_file():
            return path
    pytest.skip("no headless browser: /usr/bin/chromium is absent (`apt-get install -y chromium`; .ci/run does it)")


def render(page: Path, *, screenshot: Path | None = None, size: str = "1300,1600", budget_ms: int = 15000) -> str:
    """The DOM of ``page`` after its scripts ran, from headless Chromium with no network (every host name
    unresolvable); ``screenshot``: also write a PNG of the window."""
    exe = chromium()
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        base = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--host-resolver-rules=MAP * ~NOTFOUND", f"--user-data-dir={profile}",
                f"--virtual-time-budget={budget_ms}", f"--window-size={size}"]
        url = Path(page).resolve().as_uri()
        res = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=180)
        assert res.returncode == 0 and "<html" in res.stdout.lower(), f"chromium failed on {url}: {res.stderr[-2000:]}"
        if screenshot is not None:
            shot = subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, text=True,
                                  timeout=180)
            assert shot.returncode == 0 and Path(screenshot).stat().st_size > 0, shot.stderr[-2000:]
    return res.stdout


@dataclass
class Chart:
    """One top-level ``<svg>``: the id of the ``<div>`` around it, its size, and how many data marks it holds."""

    div: str | None
    width: float
    height: float
    marks: int = 0
    shapes: int = 0
    kinds: set[str] = field(default_factory=set)


class _SVGs(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.charts: list[Chart] = []
        self.divs: list[str | None] = []
        self.stack: list[tuple[str, bool]] = []  # open elements inside the current svg: (tag, holds data marks)
        self.current: Chart | None = None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if self.current is None:
            if tag == "div":
                self.divs.append(a.get("id"))
            elif tag == "svg":
                self.current = Chart(div=next((d for d in reversed(self.divs) if d), None),
                                     width=_size(a.get("width")), height=_size(a.get("height")))
                self.stack = [("svg", False)]
            return
        # Data live in Vega's mark groups (class role-mark) and inside matplotlib's clipped axes (clip-path).
        data = self.stack[-1][1] or "role-mark" in (a.get("class") or "").split() or bool(a.get("clip-path"))
        if tag in SHAPES:
            self.current.shapes += 1
            if data and not _inside_defs(self.stack) and _draws(tag, a):
                self.current.marks += 1
                self.current.kinds.add(tag)
        self.stack.append((tag, data))

    def handle_startendtag(self, tag, attrs):
        self.handle_starttag(tag, attrs)
        if self.current is not None and self.stack and self.stack[-1][0] == tag:
            self.stack.pop()

    def handle_endtag(self, tag):
        if self.current is None:
            if tag == "div" and self.divs:
                self.divs.pop()
            return
        while self.stack:
            open_tag, _ = self.stack.pop()
            if open_tag == tag:
                break
        if tag == "svg" and not self.stack:
            self.charts.append(self.current)
            self.current = None


def _draws(tag: str, a: dict) -> bool:
    """A shape that draws a datum: a path of at least 3 commands (a 2-point path is a rule: a grid line, a
    threshold), or a placed marker, rectangle, circle or polygon."""
    if tag == "path":
        return len(re.findall(r"[MLHVCSQTAZmlhvcsqtaz]", a.get("d") or "")) >= 3
    return tag != "line"


def _inside_defs(stack) -> bool:
    return any(t in ("defs", "clippath", "clipPath", "marker") for t, _ in stack)


def _size(v: str | None) -> float:
    try:
        return float(str(v).removesuffix("pt").removesuffix("px"))
    except (TypeError, ValueError):
        return 0.0


def charts(dom: str, *, min_size: float = 100.0) -> list[Chart]:
    """Every top-level ``<svg>`` of at least ``min_size`` in width and height (icons are smaller), drawn or not."""
    parser = _SVGs()
    parser.feed(dom)
    return [c for c in parser.charts if c.width >= min_size and c.height >= min_size]


def drawn(dom: str) -> list[Chart]:
    """The charts of ``dom`` that draw data (at least one data mark)."""
    return [c for c in charts(dom) if c.marks > 0]
