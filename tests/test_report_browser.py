"""The report in a real headless browser (Chromium): every query section is in the rendered DOM, every image
loads (naturalWidth > 0), and the page's screenshot is not blank. Skipped where `chromium` is not installed
(.ci/run installs it from the system's packages when it can)."""
import html
import json
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from fgvce_jax import data, report
from test_report import _write_methods

CHROMIUM = shutil.which("chromium")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not on PATH (apt-get install chromium)")

# Runs after the page has loaded: what the browser made of it, as JSON in <pre id="browser-check">.
CHECK = """<script>window.addEventListener("load", () => {
  const out = document.createElement("pre");
  out.id = "browser-check";
  out.textContent = JSON.stringify({
    ids: [...document.querySelectorAll("[id]")].map(e => e.id),
    images: [...document.images].map(i => [i.getAttribute("src"), i.complete, i.naturalWidth, i.naturalHeight]),
  });
  document.body.appendChild(out);
});</script>"""


def _chromium(tmp_path, *args, timeout=120):
    """Run headless Chromium with its own profile (other runs may share the machine); returns stdout."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
           "--hide-scrollbars", "--virtual-time-budget=10000", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_the_report_renders_every_query_and_image_in_chromium(tmp_path, monkeypatch):
    rows, qds, rds = _write_methods(tmp_path / "out")
    for method in ("cve", "random"):  # fgvce's 3 queries only: each figure costs about 2 s on 2 cores
        shutil.rmtree(tmp_path / "out" / method)
        del rows[method]
    monkeypatch.setattr(data, "load", lambda name, split, **kw: qds if split == "test" else rds)
    page = report.write_report(tmp_path / "out")
    # the page with the check appended, beside it so that its relative image paths resolve alike
    checked = page.with_name("browser-check.html")
    checked.write_text(page.read_text().replace("</body>", CHECK + "</body>"))
    dom = _chromium(tmp_path, "--dump-dom", checked.as_uri())
    seen = json.loads(html.unescape(dom.split("<pre id=\"browser-check\">")[1].split("</pre>")[0]))
    for method, method_rows in rows.items():
        assert f"m-{method}" in seen["ids"]
        assert [i for i in seen["ids"] if i.startswith(f"{method}-q")] == [f"{method}-q{i}"
                                                                            for i in range(len(method_rows))]
    assert len(seen["images"]) == sum(len(r) for r in rows.values())
    for src, complete, width, height in seen["images"]:
        with Image.open(page.parent / src) as img:
            assert complete and (width, height) == img.size, src  # decoded by the browser at its own size

    shot = tmp_path / "shot.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB"), np.float64)
    assert pixels.shape == (1600, 1200, 3)
    assert pixels.std() > 20 and len(np.unique(pixels.reshape(-1, 3), axis=0)) > 256  # text and figures drawn
