"""The report page as a user sees it: report.html of the synthetic sweep opened in headless Chromium
(from Debian's packages, `make browser`), every figure loaded and drawn (its part of the full-page
screenshot is not blank), and no console error."""

from __future__ import annotations

import os
import sys

import pytest
import report_sweep as S
from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
import browser  # noqa: E402

from sdft_cli.analysis import write_report  # noqa: E402


def _chromium_or_skip() -> None:
    if browser.chromium() is None:
        if os.environ.get("SDFT_REQUIRE_BROWSER"):
            pytest.fail("SDFT_REQUIRE_BROWSER is set but no Chromium is installed (make browser)")
        pytest.skip("no Chromium (make browser)")


def test_the_report_page_renders_every_figure_without_console_errors(tmp_path):
    _chromium_or_skip()
    root = S.build(tmp_path / "sweep")
    html = write_report(root)
    out = browser.visit(html, tmp_path / "page.png")
    figures = {img["id"] for img in out["images"]}
    expected = set(__import__("json").loads((root / "report.json").read_text())["figures"])
    assert figures == expected and len(expected) >= 9
    assert all(img["w"] > 200 and img["complete"] for img in out["images"])
    assert browser.blank_images(out) == []
    assert out["errors"] == []
    assert (tmp_path / "page.png").stat().st_size > 50_000 and out["height"] > 3000


def test_the_blank_check_sees_a_missing_figure(tmp_path):
    """The check can fail: a page whose figure points at nothing is reported, with its console error."""
    _chromium_or_skip()
    page = tmp_path / "broken.html"
    page.write_text("<html><body><figure id='gone'><img src='missing.png' width='400' height='300'></figure>")
    out = browser.visit(page)
    assert browser.blank_images(out) == ["gone"]
    assert any("missing.png" in e or "ERR_FILE_NOT_FOUND" in e for e in out["errors"]), out["errors"]
