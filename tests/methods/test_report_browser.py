"""report.html as a person sees it: rendered by headless Chromium, offline."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.unit.test_report import build_examples, build_results, write_run_metrics
from tunesmith.eval.report import write_report

CHROMIUM = Path("/usr/bin/chromium")
# No network, no first-run work, no GPU: the page must render from the file alone.
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs Debian's chromium package for this test "
                    "(or run `apt-get install -y chromium`)")
    return subprocess.run([str(CHROMIUM), *FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("browser")
    results = build_results(write_run_metrics(tmp / "run"), third=True)
    return write_report(results, build_examples(), tmp / "out", title="tiny: base vs tuned")


def test_report_renders_tables_and_images(report: Path, tmp_path: Path) -> None:
    done = _chromium(tmp_path / "profile", "--dump-dom", report.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    assert 'id="scores"' in dom and 'id="examples"' in dom and 'id="headline"' in dom
    assert "tuned beats base on exact match by +62.5 points" in dom
    assert dom.count('src="data:image/png;base64,') == 3
    assert dom.count("data-row=") == 16
    # the escaped script in a prompt stayed text: the browser built no <script> element from it
    assert "<script" not in dom and "&lt;script&gt;" in dom


def test_report_screenshot(report: Path, tmp_path: Path) -> None:
    shot = tmp_path / "report.png"
    done = _chromium(tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000", report.as_uri())
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 50_000  # a blank page is a few kB; this one has tables and plots
