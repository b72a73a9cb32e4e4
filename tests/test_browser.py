"""The page at `GET /`, driven in headless Chromium against a real `osdface serve` process.

Uploads a real photo from the shared assets, waits for the restored image, and checks it against
the API's own answer for the same photo and against the photo itself: natural size, face boxes
drawn where the API put them, timings listed, a download link. Saves screenshots to artifacts/.
Needs Debian's chromium and chromium-driver (installed by .ci/run); skips with a reason without.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image, ImageOps

from tests.live_server import REPO, e2e_server, skip

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = REPO / "artifacts"
PHOTO = Path("images/gfpgan/whole_imgs/Blake_Lively.jpg")  # 700x464, two faces
RESULT_TIMEOUT_S = 180

# The flags this machine's Chromium needs: no sandbox as root, and no background connections
# (the network is closed, they would be refused over and over).
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--window-size=1280,1800",
)


def _require_chromium() -> None:
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        skip(f"{CHROMIUM} or {CHROMEDRIVER} missing (apt-get install chromium chromium-driver)")


@pytest.fixture(scope="module")
def server(tiny_weights_dir: Path, assets: Path, tmp_path_factory) -> Iterator[str]:
    _require_chromium()  # before paying for a server start
    with e2e_server(tiny_weights_dir, tmp_path_factory, "browser-server") as base:
        yield base


@pytest.fixture(scope="module")
def driver() -> Iterator[object]:
    _require_chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="osdface-chromium-")
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    browser = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    browser.set_script_timeout(30)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


def _wait_for_state(driver, states: tuple[str, ...]) -> str:
    from selenium.webdriver.support.ui import WebDriverWait

    def state(d) -> str | bool:
        value = d.execute_script("return document.getElementById('result').dataset.state")
        return value if value in states else False

    return WebDriverWait(driver, RESULT_TIMEOUT_S, poll_frequency=0.25).until(state)


def _severe_console_messages(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def _api_restore(base: str, photo: Path) -> dict:
    response = httpx.post(
        f"{base}/restore",
        files={"image": (photo.name, photo.read_bytes(), "image/jpeg")},
        headers={"Accept": "application/json"},
        timeout=RESULT_TIMEOUT_S,
    )
    assert response.status_code == 200, response.text
    return response.json()


def _assert_overlay_aligned(driver, box: list[float], width: int, height: int) -> None:
    """On screen, the first outline covers the same fraction of the displayed picture as `box`
    (input pixels) covers of the `width` x `height` photo, whatever the displayed size."""
    geometry = driver.execute_script(
        "const img = document.getElementById('after').getBoundingClientRect();"
        "const r = document.querySelector('#faces rect.face-box').getBoundingClientRect();"
        "return [img.left, img.top, img.width, img.height, r.left, r.top, r.width, r.height];"
    )
    il, it, iw, ih, rl, rt, rw, rh = geometry
    x1, y1, x2, y2 = box
    stroke_px = 4  # the outline's stroke straddles the box edge
    assert rl - il == pytest.approx(x1 / width * iw, abs=stroke_px)
    assert rt - it == pytest.approx(y1 / height * ih, abs=stroke_px)
    assert rw == pytest.approx((x2 - x1) / width * iw, abs=2 * stroke_px)
    assert rh == pytest.approx((y2 - y1) / height * ih, abs=2 * stroke_px)


def _natural_sizes(driver) -> list:
    return driver.execute_script(
        "const a = document.getElementById('after'), b = document.getElementById('before');"
        "return [a.complete, a.naturalWidth, a.naturalHeight, b.naturalWidth, b.naturalHeight];"
    )


def test_page_restores_an_uploaded_photo(server: str, driver, assets: Path) -> None:
    from selenium.webdriver.common.by import By

    photo = assets / PHOTO
    with Image.open(photo) as im:
        width, height = ImageOps.exif_transpose(im).size

    driver.get(f"{server}/")
    assert driver.title.startswith("OSDFace")
    driver.find_element(By.ID, "image-input").send_keys(str(photo))
    driver.find_element(By.ID, "submit").click()
    assert _wait_for_state(driver, ("done", "error")) == "done", driver.find_element(
        By.ID, "message"
    ).text

    sizes = _natural_sizes(driver)
    assert sizes == [True, width, height, width, height], "restored image at the photo's size"

    # The same photo through the API: the page must show exactly what the API answers.
    expected = _api_restore(server, photo)
    assert (expected["width"], expected["height"]) == (width, height)
    assert expected["faces_detected"] >= 1, "a real detector finds the faces of this photo"
    shown = driver.find_element(By.ID, "faces-count").text
    assert shown == str(expected["faces_detected"])
    boxes = driver.execute_script(
        "return [...document.querySelectorAll('#faces rect.face-box')].map(r =>"
        " [+r.getAttribute('x'), +r.getAttribute('y'),"
        "  +r.getAttribute('x') + +r.getAttribute('width'),"
        "  +r.getAttribute('y') + +r.getAttribute('height')]);"
    )
    assert len(boxes) == expected["faces_detected"]
    for drawn, face in zip(boxes, expected["faces"], strict=True):
        assert drawn == pytest.approx(face["box"], abs=1e-3)

    _assert_overlay_aligned(driver, expected["faces"][0]["box"], width, height)

    timing_rows = driver.execute_script(
        "return [...document.querySelectorAll('#timings tr')].map(tr => tr.cells[0].textContent);"
    )
    assert {"round trip (browser)", "total (server)", "queue", "inference"} <= set(timing_rows)
    link = driver.find_element(By.ID, "download")
    assert link.get_attribute("href").startswith("blob:")
    assert link.get_attribute("download") == "Blake_Lively-restored.jpg"
    assert _severe_console_messages(driver) == []

    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "browser-restore.png"))


def test_page_upscaled_result_keeps_the_outlines_on_the_faces(
    server: str, driver, assets: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    photo = assets / PHOTO
    with Image.open(photo) as im:
        width, height = ImageOps.exif_transpose(im).size
    driver.get(f"{server}/")
    driver.find_element(By.ID, "image-input").send_keys(str(photo))
    Select(driver.find_element(By.ID, "opt-upscale")).select_by_value("2")
    Select(driver.find_element(By.ID, "opt-format")).select_by_value("png")
    driver.find_element(By.ID, "submit").click()
    assert _wait_for_state(driver, ("done", "error")) == "done", driver.find_element(
        By.ID, "message"
    ).text
    assert _natural_sizes(driver) == [True, 2 * width, 2 * height, width, height]
    assert driver.find_element(By.ID, "result-format").text == "image/png"
    assert driver.find_element(By.ID, "download").get_attribute("download").endswith(".png")
    box = driver.execute_script(
        "const r = document.querySelector('#faces rect.face-box');"
        "return ['x', 'y', 'width', 'height'].map(k => +r.getAttribute(k));"
    )
    x, y, w, h = box
    _assert_overlay_aligned(driver, [x, y, x + w, y + h], width, height)
    assert _severe_console_messages(driver) == []


def test_page_shows_the_error_of_a_bad_upload(server: str, driver, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    fake = tmp_path / "not-a-photo.jpg"
    fake.write_bytes(b"this is text, not a JPEG\n")
    api = httpx.post(
        f"{server}/restore",
        files={"image": (fake.name, fake.read_bytes(), "image/jpeg")},
        headers={"Accept": "application/json"},
        timeout=60,
    )
    assert 400 <= api.status_code < 500
    driver.get(f"{server}/")
    driver.find_element(By.ID, "image-input").send_keys(str(fake))
    driver.find_element(By.ID, "submit").click()
    assert _wait_for_state(driver, ("done", "error")) == "error"
    message = driver.find_element(By.ID, "message").text
    assert api.json()["error"]["message"] in message, message
    assert f"HTTP {api.status_code}" in message, message
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "browser-bad-upload.png"))


def test_static_files_are_an_allow_list(server: str) -> None:
    page = httpx.get(f"{server}/", timeout=10)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = httpx.get(f"{server}/static/{name}", timeout=10)
        assert response.status_code == 200 and kind in response.headers["content-type"]
        assert response.content == (REPO / "service/static" / name).read_bytes()
    for path in ("/static/index.html", "/static/../settings.py", "/static/%2e%2e/web.py"):
        assert httpx.get(f"{server}{path}", timeout=10).status_code == 404, path
