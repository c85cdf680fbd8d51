"""DVC plots that render with no network: an HTML template for ``dvc plots show`` with Vega inlined.

``dvc plots show`` fills ``{plot_divs}`` of its page with one ``<div>`` per plot,
each an inline script ``vegaEmbed('#id', spec)``, and ``{scripts}`` with three
``<script src="https://cdn.jsdelivr.net/...">`` tags (vega, vega-lite, vega-embed).
On a machine without internet those never load and the page stays blank.

:func:`offline_template` is a page with ``{plot_divs}`` and ``{refresh_tag}`` but no
``{scripts}``, so DVC's CDN tags are dropped, and with the three libraries inlined in
the head instead: the JavaScript bundle of ``vl-convert-python`` (Vega, Vega-Lite and
Vega-Embed with every dependency, no imports), which sets ``window.vegaEmbed`` before
DVC's inline scripts run. ``.dvc/config`` points ``plots.html_template`` at the
generated file (:data:`TEMPLATE_PATH`, kept in git), so ``dvc plots show`` and
``dvc plots diff`` work offline as they are; ``unlearn plots-template`` rewrites it.
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE_PATH = Path(".dvc") / "plots_offline.html"
"""Where the project keeps the template (``plots.html_template = plots_offline.html`` in ``.dvc/config``, which
DVC resolves against the ``.dvc`` directory)."""

VEGA_LITE_VERSION = "5.21"
"""DVC's built-in plot templates are Vega-Lite v5 specs: bundle the v5 compiler they were written for."""

PLACEHOLDERS = ("{plot_divs}", "{refresh_tag}")
"""What DVC replaces in a template (``{plot_divs}`` is required). ``{scripts}`` is left out on purpose."""


def javascript_bundle(vl_version: str = VEGA_LITE_VERSION) -> tuple[str, str]:
    """``(bundle, versions)``: Vega + Vega-Lite + Vega-Embed as one classic script that sets ``window.vegaEmbed``,
    ``window.vega`` and ``window.vegaLite``, and a line naming the versions inside it."""
    try:
        import vl_convert as vlc
    except ImportError as e:  # pragma: no cover - a dependency in pyproject.toml
        raise RuntimeError("vl-convert-python is not installed: pip install vl-convert-python") from e

    js = vlc.javascript_bundle(vl_version=f"v{vl_version.lstrip('v')}")
    versions = (f"vega {vlc.get_vega_version()}, vega-lite {vl_version.lstrip('v')}, "
                f"vega-embed {vlc.get_vega_embed_version()} (bundled by vl-convert-python "
                f"{getattr(vlc, '__version__', '?')})")
    return js, versions


def offline_template(bundle: str, versions: str = "") -> str:
    """The page DVC fills: the bundle inlined (inside a function, so its top-level names cannot clash with the
    ``var spec`` of DVC's plot scripts), ``{refresh_tag}`` and ``{plot_divs}``; no ``{scripts}``."""
    for bad in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}"):
        if bad.lower() in bundle.lower():
            raise ValueError(f"the JavaScript bundle contains {bad!r}: it cannot be inlined in a DVC template")
    return f"""<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <meta charset="utf-8">
    <title>DVC Plot</title>
    <!-- Offline DVC plots template: written by `unlearn plots-template` (src/unlearn/eval/offline_plots.py).
         Inlined: {versions or "vega, vega-lite, vega-embed"}. Licenses: BSD-3-Clause (Vega projects).
         DVC's placeholder for its CDN script tags is left out on purpose: this page loads nothing. -->
    <script type="text/javascript">
(function () {{
{bundle}
}})();
    </script>
    <style>
        body {{ font-family: system-ui, sans-serif; }}
        table {{ border-spacing: 15px; }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def write_template(path: str | Path = TEMPLATE_PATH, vl_version: str = VEGA_LITE_VERSION) -> Path:
    """Write :func:`offline_template` with the bundle of ``vl_version`` to ``path``; return it."""
    path = Path(path)
    js, versions = javascript_bundle(vl_version)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(offline_template(js, versions), encoding="utf8")
    tmp.replace(path)
    return path


def check_template(text: str) -> list[str]:
    """What is wrong with a template for offline use (empty: nothing): DVC's required placeholder, no CDN
    placeholder, no script or stylesheet loaded from a URL, and the inlined ``vegaEmbed``."""
    import re

    problems = []
    if "{plot_divs}" not in text:
        problems.append("no {plot_divs} placeholder (DVC refuses the template)")
    if "{scripts}" in text:
        problems.append("a {scripts} placeholder: DVC puts its CDN <script src=...> tags there")
    for m in re.finditer(r"<(script|link)\b[^>]*\b(src|href)\s*=\s*[\"']?(https?:)?//", text, flags=re.I):
        problems.append(f"loads from the network: {m.group(0)}")
    if "window.vegaEmbed" not in text:
        problems.append("no inlined vega-embed (window.vegaEmbed is never set)")
    return problems
