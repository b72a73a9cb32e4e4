"""The page at `GET /`, driven in headless Chromium against a real `osdface serve` process.

Uploads a real photo from the shared assets, waits for the restored image, and checks it against
the API's own answer for the same photo and against the photo itself: natural size, face boxes
drawn where the API put them, timings listed, a download link. Saves screenshots to artifacts/.
Needs Debian's chromium and chromium-driver (installed by .ci/run); skips with a reason without.
"""

from __future__ import annotations

import io
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image, ImageOps

from tests.live_server import REPO, e2e_server, skip

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ARTIFACTS = REPO / "artifacts"
PHOTO = Path("images/gfpgan/whole_imgs/Blake_Lively.jpg")  # 700x464, two faces
RESULT_TIMEOUT_S = 180
SPIN_BUTTONS_PX = 16  # what Chromium's number inputs keep for their arrows, right of the text

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


def _open_page(driver, base: str) -> None:
    """Load the page and wait until its readiness poll has enabled the button."""
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{base}/")
    WebDriverWait(driver, 30, poll_frequency=0.1).until(
        lambda d: d.execute_script("return !document.getElementById('submit').disabled")
    )


def _record_messages(driver) -> None:
    """Keep every text the status line shows from now on, in window.__messages."""
    driver.execute_script(
        "window.__messages = [];"
        "new MutationObserver(() => window.__messages.push("
        "  document.getElementById('message').textContent))"
        ".observe(document.getElementById('message'), {childList: true, characterData: true,"
        " subtree: true});"
    )


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

    _open_page(driver, server)
    assert driver.title.startswith("OSDFace")
    driver.find_element(By.ID, "image-input").send_keys(str(photo))
    _record_messages(driver)
    driver.find_element(By.ID, "submit").click()
    assert _wait_for_state(driver, ("done", "error")) == "done", driver.find_element(
        By.ID, "message"
    ).text
    # What the status line said on the way: the upload, then the restoring with its clock.
    seen = driver.execute_script("return window.__messages")
    first_restoring = next(i for i, m in enumerate(seen) if m.startswith("Restoring… "))
    assert any(m.startswith("Uploading") for m in seen[:first_restoring]), seen
    assert re.match(r"Restoring… \d+ s", seen[first_restoring]), seen
    assert seen[-1].startswith("Restored "), seen

    sizes = _natural_sizes(driver)
    assert sizes == [True, width, height, width, height], "restored image at the photo's size"

    # The same photo through the API: the page must show exactly what the API answers.
    expected = _api_restore(server, photo)
    assert (expected["width"], expected["height"]) == (width, height)
    assert expected["faces_detected"] >= 1, "a real detector finds the faces of this photo"
    assert expected["faces_restored"] == expected["faces_detected"], "no option chose fewer"
    shown = driver.find_element(By.ID, "faces-count").text
    assert shown == str(expected["faces_detected"])
    boxes = driver.execute_script(
        "return [...document.querySelectorAll('#faces rect.face-box')].map(r =>"
        " [+r.getAttribute('x'), +r.getAttribute('y'),"
        "  +r.getAttribute('x') + +r.getAttribute('width'),"
        "  +r.getAttribute('y') + +r.getAttribute('height')]);"
    )
    assert len(boxes) == expected["faces_restored"]
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


def test_page_says_how_many_of_the_faces_found_were_restored(
    server: str, driver, assets: Path
) -> None:
    from selenium.webdriver.common.by import By

    _open_page(driver, server)
    driver.find_element(By.ID, "image-input").send_keys(str(assets / PHOTO))
    driver.find_element(By.ID, "opt-center").click()  # one of the photo's two faces
    driver.find_element(By.ID, "submit").click()
    assert _wait_for_state(driver, ("done", "error")) == "done", driver.find_element(
        By.ID, "message"
    ).text
    assert driver.find_element(By.ID, "faces-count").text == "1 of 2"
    assert driver.find_element(By.ID, "message").text == "Restored 1 of 2 faces."
    assert len(driver.find_elements(By.CSS_SELECTOR, "#faces rect.face-box")) == 1
    driver.find_element(By.ID, "opt-center").click()  # the next test starts from the defaults


def test_page_upscaled_result_keeps_the_outlines_on_the_faces(
    server: str, driver, assets: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    photo = assets / PHOTO
    with Image.open(photo) as im:
        width, height = ImageOps.exif_transpose(im).size
    _open_page(driver, server)
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


# The geometry the layout test reads: what is shown of each [hidden] element, the timing rows
# with the left edge of their text, the text lines of the slider's two labels, and each
# placeholder's width against the room its number input has for it.
_LAYOUT_JS = """
const textLeft = (el) => { const r = document.createRange(); r.selectNodeContents(el);
  return r.getBoundingClientRect().left; };
const lines = (el) => { const r = document.createRange(); r.selectNodeContents(el);
  return new Set([...r.getClientRects()].map((c) => Math.round(c.top))).size; };
const ctx = document.createElement('canvas').getContext('2d');
const room = (el) => { const cs = getComputedStyle(el); ctx.font = cs.font;
  return [el.id, ctx.measureText(el.placeholder).width,
          el.clientWidth - parseFloat(cs.paddingLeft) - parseFloat(cs.paddingRight)]; };
return {
  hiddenShown: [...document.querySelectorAll('[hidden]')]
    .filter((el) => getComputedStyle(el).display !== 'none').map((el) => el.id),
  timings: Object.fromEntries([...document.querySelectorAll('#timings tr')]
    .map((tr) => [tr.cells[0].textContent, textLeft(tr.cells[0])])),
  sliderLines: [...document.querySelectorAll('.slider-label span')]
    .map((el) => [el.textContent, lines(el)]),
  placeholders: [...document.querySelectorAll('input[type=number][placeholder]')].map(room),
  dropText: document.getElementById('drop-text').textContent,
};
"""


def test_page_layout_at_desktop_and_phone_width(server: str, driver, assets: Path) -> None:
    from selenium.webdriver.common.by import By

    from model.media.codecs.formats import FORMATS

    _open_page(driver, server)
    drop_text = driver.execute_script(_LAYOUT_JS)["dropText"].lower()
    assert all(fmt in drop_text for fmt in FORMATS), drop_text  # every format the server takes
    driver.find_element(By.ID, "image-input").send_keys(str(assets / PHOTO))
    driver.find_element(By.ID, "submit").click()
    assert _wait_for_state(driver, ("done", "error")) == "done"
    ARTIFACTS.mkdir(exist_ok=True)
    try:
        for width in (1280, 390):
            driver.set_window_size(width, 1800)
            layout = driver.execute_script(_LAYOUT_JS)
            driver.save_screenshot(str(ARTIFACTS / f"browser-layout-{width}.png"))
            driver.execute_script("document.getElementById('video-section').scrollIntoView()")
            driver.save_screenshot(str(ARTIFACTS / f"browser-layout-{width}-video.png"))
            assert "video-cancel" in driver.execute_script(
                "return [...document.querySelectorAll('[hidden]')].map(e => e.id)"
            )
            assert layout["hiddenShown"] == [], width
            left = layout["timings"]
            # Model stages sit under inference; the CPU stages beside it, all under total.
            assert left["total (server)"] < left["inference"] < left["unet"], left
            for stage in ("decode", "detect", "align", "queue", "paste", "encode"):
                assert left[stage] == left["inference"], (stage, left)
            assert left["vre"] == left["vae_decode"] == left["unet"], left
            assert [n for _, n in layout["sliderLines"]] == [1, 1], (width, layout)
            for name, needed, room in layout["placeholders"]:
                assert needed + SPIN_BUTTONS_PX <= room, (width, name, needed, room)
    finally:
        driver.set_window_size(1280, 1800)


def test_page_restores_a_heic_photo_it_cannot_display(
    server: str, driver, assets: Path, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    from model.media.codecs.heif import register_heif

    if not register_heif():
        skip("pillow-heif is not installed: no HEIC to upload")
    heic = tmp_path / "phone.heic"
    with Image.open(assets / PHOTO) as im:
        im.convert("RGB").save(heic, "HEIF")
    _open_page(driver, server)
    driver.find_element(By.ID, "image-input").send_keys(str(heic))
    driver.find_element(By.ID, "submit").click()
    assert _wait_for_state(driver, ("done", "error")) == "done", driver.find_element(
        By.ID, "message"
    ).text
    link = driver.find_element(By.ID, "download")
    assert link.get_attribute("href").startswith("blob:")
    assert link.get_attribute("download") == "phone-restored.heic"
    assert driver.find_element(By.ID, "result-format").text == "image/heic"
    shown = driver.execute_script("return !document.getElementById('compare').hidden")
    if not shown:  # Chromium has no HEIC decoder: the page says where the result is
        assert "use Download" in driver.find_element(By.ID, "message").text
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "browser-heic.png"))


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
    _open_page(driver, server)
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


def test_page_checks_the_size_before_sending(server: str, driver, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    limit = httpx.get(f"{server}/v1/info", timeout=10).json()["limits"]["max_upload_bytes"]
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\xff\xd8\xff" + bytes(limit))
    before = httpx.get(f"{server}/metrics", timeout=10).text.count('endpoint="/restore"')
    _open_page(driver, server)
    driver.find_element(By.ID, "image-input").send_keys(str(big))
    message = driver.find_element(By.ID, "message").text
    assert "this server takes at most" in message, message
    driver.find_element(By.ID, "submit").click()
    assert "this server takes at most" in driver.find_element(By.ID, "message").text
    assert driver.find_element(By.ID, "result").get_attribute("hidden") is not None
    after = httpx.get(f"{server}/metrics", timeout=10).text.count('endpoint="/restore"')
    assert after == before, "the page sent the oversized file"


def test_docs_load_without_any_external_request(server: str, driver) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("browser")  # what earlier tests left in the log
    driver.get(f"{server}/docs")
    WebDriverWait(driver, 30, poll_frequency=0.25).until(
        lambda d: d.execute_script("return document.querySelectorAll('.opblock').length") >= 5
    )
    title = driver.execute_script("return document.querySelector('.swagger-ui .title').textContent")
    assert title.startswith("OSDFace")
    urls = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name).concat([location.href]);"
    )
    assert urls and all(u.startswith(server) for u in urls), urls
    assert _severe_console_messages(driver) == []
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / "browser-docs.png"))


@pytest.fixture
def failed_server(tmp_path: Path) -> Iterator[str]:
    """The real app under uvicorn in this process, its weights missing: the load fails. (Under
    `osdface serve` the process would exit; here it stays up for the page to be looked at.)"""
    _require_chromium()
    import uvicorn

    from service.app import create_app
    from service.settings import Settings
    from tests.live_server import free_port, http_status, wait_until

    port = free_port()
    settings = Settings(weights_dir=tmp_path / "missing", device="cpu", warmup=False)
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    wait_until(lambda: http_status(f"{base}/readyz") == 503, 60, "the failed load")
    try:
        yield base
    finally:
        server.should_exit = True
        thread.join(30)


def test_page_shows_why_the_model_failed_to_load(failed_server: str, driver) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    reason = httpx.get(f"{failed_server}/readyz", timeout=10).json()["error"]["message"]
    assert "vre.safetensors" in reason
    driver.get(f"{failed_server}/")
    badge = driver.find_element(By.ID, "service-status")
    WebDriverWait(driver, 30, poll_frequency=0.1).until(
        lambda d: badge.get_attribute("data-reason") == "model_failed"
    )
    assert badge.text == reason and reason.startswith("loading the model failed")
    assert driver.find_element(By.ID, "submit").get_attribute("disabled") is not None
    ARTIFACTS.mkdir(exist_ok=True)
    shot = driver.get_screenshot_as_png()
    (ARTIFACTS / "browser-load-failed.png").write_bytes(shot)
    # The screenshot itself shows the badge in the failure colour (--bad, #c62f2f).
    scale = driver.execute_script("return window.devicePixelRatio") or 1
    r = badge.rect
    with Image.open(io.BytesIO(shot)) as im:
        crop = im.convert("RGB").crop(
            tuple(round(v * scale) for v in (r["x"], r["y"], r["x"] + r["width"], r["y"] + 20))
        )
        rgb = np.asarray(crop, dtype=np.int32)
    reds = int(((rgb[..., 0] > 150) & (rgb[..., 1] < 90) & (rgb[..., 2] < 90)).sum())
    assert reds > 20, "the failure badge is not visible in red"
