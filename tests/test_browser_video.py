"""The page's video part in headless Chromium against a real `osdface serve`: upload a clip made
from a real photo, follow the job's progress, play the restored clip, download it.

Needs Debian's chromium and chromium-driver; skips with a reason without.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.live_server import running_server, skip
from tests.test_browser import CHROMEDRIVER, CHROMIUM, CHROMIUM_FLAGS
from tests.video_helpers import photo_frame, write_clip

FRAMES = 3
TIMEOUT_S = 240


@pytest.fixture(scope="module")
def server(tiny_weights_dir: Path, tmp_path_factory) -> Iterator[str]:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        skip(f"{CHROMIUM} or {CHROMEDRIVER} missing (apt-get install chromium chromium-driver)")
    folder = tmp_path_factory.mktemp("browser-video")
    env = {
        "OSDFACE_CPU_WORKERS": "1",
        "OSDFACE_SHUTDOWN_GRACE_S": "5",
        "OSDFACE_JOBS_DIR": str(folder / "jobs"),
        "OMP_NUM_THREADS": "1",
    }
    with running_server(tiny_weights_dir, folder / "serve.log", env) as live:
        yield live.base


@pytest.fixture(scope="module")
def driver() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="osdface-chromium-")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (
        *CHROMIUM_FLAGS,
        f"--user-data-dir={profile}",
        "--autoplay-policy=no-user-gesture-required",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    browser.set_script_timeout(30)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_page_restores_an_uploaded_video(server: str, driver, assets: Path, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    clip = tmp_path / "family.mp4"
    write_clip(clip, [photo_frame(assets)] * FRAMES, fps=10)
    driver.get(f"{server}/")
    driver.find_element(By.ID, "video-input").send_keys(str(clip))
    driver.find_element(By.ID, "video-submit").click()

    def finished(d) -> str | bool:
        message = d.find_element(By.ID, "video-message").get_attribute("class")
        return message if ("ok" in message or "error" in message) else False

    outcome = WebDriverWait(driver, TIMEOUT_S, poll_frequency=0.25).until(finished)
    message = driver.find_element(By.ID, "video-message").text
    assert "ok" in outcome, message
    status = driver.find_element(By.ID, "video-status").text
    assert f"frame {FRAMES} of {FRAMES}" in status, status
    job_id = driver.find_element(By.ID, "video-job").text
    view = httpx.get(f"{server}/v1/jobs/{job_id}", timeout=10).json()
    assert view["state"] == "succeeded"
    assert driver.find_element(By.ID, "video-faces").text == str(view["faces"]) == "6"
    link = driver.find_element(By.ID, "video-download")
    assert link.get_attribute("href").startswith("blob:")
    assert link.get_attribute("download") == "family-restored.mp4"
    player = WebDriverWait(driver, 30).until(
        lambda d: d.execute_script(
            "const v = document.getElementById('video-player');"
            "return v.readyState >= 1 || v.error ? [v.readyState, v.error && v.error.code,"
            " v.videoWidth, v.videoHeight, v.duration] : false;"
        )
    )
    _, error, width, height, duration = player
    assert error is None, f"the browser could not play the result (MediaError {error})"
    assert (width, height) == (256, 170)
    assert duration == pytest.approx(FRAMES / 10, abs=0.05)
    severe = [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert severe == []
    assert httpx.get(f"{server}/static/video.js", timeout=10).status_code == 200
