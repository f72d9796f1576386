"""Render a report page in a real headless browser and save a screenshot.

Used by ``scripts/screenshot_report.py`` (the README's picture) and by tests that check the
page renders offline (:func:`screenshot`) and what text the rendered page holds
(:func:`rendered_text`). It needs a Chromium binary (Debian: ``apt-get install chromium``); the
browser runs with networking off, so a page that needed the network would render broken.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

CANDIDATES = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--hide-scrollbars",
    "--no-first-run",
    "--disable-extensions",
)


def find_browser() -> str | None:
    """Path of the first Chromium-family browser on PATH, or None."""
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def screenshot(
    page: str | Path, out: str | Path, width: int = 1280, height: int = 1600, timeout: float = 120.0
) -> Path:
    """Screenshot ``page`` (a local HTML file) into ``out`` (PNG); returns ``out``.

    Raises ``RuntimeError`` with the browser's output when no browser is found or it fails.
    """
    browser = find_browser()
    if browser is None:
        raise RuntimeError("no Chromium-family browser on PATH (Debian: apt-get install chromium)")
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mixtune-browser-") as profile:
        cmd = [
            browser,
            *FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={width},{height}",
            f"--screenshot={out}",
            Path(page).resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"{browser} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return out


def rendered_text(page: str | Path, timeout: float = 120.0) -> str:
    """The DOM of ``page`` (a local HTML file) as the browser serialises it after rendering.

    Raises ``RuntimeError`` as :func:`screenshot` does.
    """
    browser = find_browser()
    if browser is None:
        raise RuntimeError("no Chromium-family browser on PATH (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory(prefix="mixtune-browser-") as profile:
        cmd = [browser, *FLAGS, f"--user-data-dir={profile}", "--dump-dom"]
        cmd.append(Path(page).resolve().as_uri())
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0 or "<body" not in proc.stdout:
        raise RuntimeError(f"{browser} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return proc.stdout
