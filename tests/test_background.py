"""Background super-resolution: tiny Real-ESRGAN networks in the released `.pth` layout, loaded
through the real loader (restricted unpickler, key checks, spandrel), run in tiles.

References are independent of the code under test: the spandrel module the file was written
from, called on the whole image; window geometry checked against its definition; the face
footprints computed here from the crop corners.
"""

from __future__ import annotations

import io
import itertools
import os
import tracemalloc
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from model.errors import (
    InvalidInputError,
    StateDictMismatchError,
    WeightsError,
    WeightsNotFoundError,
)
from model.media.codecs.formats import ImageLimits
from model.media.faces.align import FACE_SIZE
from model.media.faces.detect import FaceDetector
from model.media.pipeline import RestoreOptions, finish_photo, make_background, prepare_photo
from model.networks.background import BackgroundUpscaler, TileSettings, axis_windows, plan_windows
from tests.tiny_realesrgan import released_keys, tiny_rrdbnet, write_tiny_realesrgan
from weights.background import convert_background, released_path
from weights.layout import sha256_file

LIMITS = ImageLimits(max_bytes=20_000_000, max_pixels=40_000_000, max_output_pixels=64_000_000)
NAMES = ("realesrgan-x2", "realesrgan-x4")
RECEPTIVE = 40  # input pixels: more than the tiny x2 network's receptive field radius (~36)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.nn.Module]]:
    root = tmp_path_factory.mktemp("realesrgan")
    return root, {name: write_tiny_realesrgan(root, name) for name in NAMES}


@pytest.fixture(scope="module")
def photo(assets: Path) -> np.ndarray:
    with Image.open(assets / "images/vqfr/whole_imgs/example.jpg") as im:
        return np.asarray(im.convert("RGB"))  # (450, 800, 3) uint8 RGB


def reference(module: torch.nn.Module, rgb: np.ndarray) -> np.ndarray:
    """The written module on the whole image, rounded to uint8 like the upscaler."""
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255.0
    with torch.no_grad():
        y = module(x).clamp(0, 1).mul(255).round().byte()
    return y[0].permute(1, 2, 0).numpy()


def untiled(up: BackgroundUpscaler, rgb: np.ndarray, scale: int) -> np.ndarray:
    return BackgroundUpscaler(up.net, TileSettings(tile=4096, overlap=0))(rgb, scale)


# --- loading -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_released_file_loads_and_reproduces_the_written_network(weights, photo, name) -> None:
    root, modules = weights
    up = BackgroundUpscaler.from_pretrained(root, name, tiles=TileSettings(4096, 0))
    assert up.scale == int(name[-1]) and up.describe()["name"] == name
    crop = photo[120:184, 300:380].copy()  # odd sizes are fine too: 64 x 80
    out = up(crop, up.scale)
    assert out.shape == (64 * up.scale, 80 * up.scale, 3) and out.dtype == np.uint8
    expected = reference(modules[name], crop)
    assert np.abs(out.astype(int) - expected).max() <= 1
    assert out.std() > 5  # not a constant image


def test_loading_reads_only_the_converted_file(tmp_path: Path, photo) -> None:
    module = write_tiny_realesrgan(tmp_path, "realesrgan-x4", seed=3, convert=False)
    with pytest.raises(WeightsNotFoundError, match="osdface weights convert"):
        BackgroundUpscaler.from_pretrained(tmp_path, "realesrgan-x4")  # loading never unpickles
    converted = convert_background(tmp_path, "realesrgan-x4")
    released_path(tmp_path, "realesrgan-x4").unlink()
    up = BackgroundUpscaler.from_pretrained(tmp_path, "realesrgan-x4")
    assert up.net.files == {"realesrgan/RealESRGAN_x4plus.safetensors": sha256_file(converted)}
    crop = photo[:40, :48].copy()
    assert np.abs(up(crop, 4).astype(int) - reference(module, crop)).max() <= 1
    with pytest.raises(WeightsNotFoundError, match="fetch --background"):
        BackgroundUpscaler.from_pretrained(tmp_path, "realesrgan-x2")


class _Payload:
    """Pickles as a call to os.system: executing it would create the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_in_a_pth_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "executed"
    net = tiny_rrdbnet(4)
    target = released_path(tmp_path, "realesrgan-x4")
    target.parent.mkdir(parents=True)
    state = released_keys(net, blocks=1)
    torch.save({"params_ema": state, "hook": _Payload(marker)}, target)
    convert_background(tmp_path, "realesrgan-x4")  # the tensors are read, the payload skipped
    BackgroundUpscaler.from_pretrained(tmp_path, "realesrgan-x4")
    torch.save({"params_ema": _Payload(marker)}, target)
    with pytest.raises(WeightsError, match="params_ema"):
        convert_background(tmp_path, "realesrgan-x4")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["missing", "unexpected", "shape"])
def test_key_and_shape_errors_name_the_tensor(tmp_path: Path, damage: str) -> None:
    state = released_keys(tiny_rrdbnet(4), blocks=1)
    if damage == "missing":
        del state["conv_hr.bias"]
    elif damage == "unexpected":
        state["conv_extra.weight"] = torch.zeros(3)
    else:
        state["conv_up1.weight"] = torch.zeros(8, 8, 1, 1)
    target = released_path(tmp_path, "realesrgan-x4")
    target.parent.mkdir(parents=True)
    torch.save({"params_ema": state}, target)
    expected = {"missing": "conv_hr.bias", "unexpected": "conv_extra.weight"}
    with pytest.raises(StateDictMismatchError, match=expected.get(damage, "conv_up1.weight")):
        convert_background(tmp_path, "realesrgan-x4")


def test_x4_file_under_the_x2_name_is_refused(tmp_path: Path) -> None:
    target = released_path(tmp_path, "realesrgan-x2")
    target.parent.mkdir(parents=True)
    torch.save({"params_ema": released_keys(tiny_rrdbnet(4), blocks=1)}, target)
    with pytest.raises(StateDictMismatchError, match=r"conv_first\.weight"):
        convert_background(tmp_path, "realesrgan-x2")


@pytest.mark.parametrize("name", NAMES)
def test_tiny_photos_are_upscaled_too(weights, name) -> None:
    up = BackgroundUpscaler.from_pretrained(weights[0], name)
    for height, width in ((1, 5), (3, 3), (7, 2)):
        rgb = np.full((height, width, 3), 120, np.uint8)
        out = up(rgb, 3)
        assert out.shape == (height * 3, width * 3, 3) and out.dtype == np.uint8


# --- tiles -------------------------------------------------------------------------------------


@pytest.mark.parametrize("align", [1, 2])
def test_windows_cover_each_pixel_once_with_context(align: int) -> None:
    for length, tile, overlap in itertools.product(range(1, 300, 7), (32, 64, 100), (0, 5, 12)):
        windows = axis_windows(length, tile, overlap, align)
        assert windows[0][0] == 0 and windows[-1][1] == length
        for (_, end, _, _), (start, _, _, _) in itertools.pairwise(windows):
            assert end == start  # cores tile the line exactly
        for c0, c1, w0, w1 in windows:
            assert 0 <= w0 <= c0 < c1 <= w1 <= length and w0 % align == 0
            assert w0 == 0 or c0 - w0 >= overlap
            assert w1 == length or w1 - c1 >= overlap
            assert w1 - w0 == min(length, tile) or (w1 == length and w1 - w0 < tile + align)


@pytest.mark.parametrize(("name", "tiles"), [(NAMES[0], (64, 20)), (NAMES[1], (48, 12))])
def test_tiled_equals_untiled(weights, photo, name, tiles) -> None:
    root, _ = weights
    up = BackgroundUpscaler.from_pretrained(root, name, tiles=TileSettings(*tiles, batch=3))
    crop = photo[150:222, 280:361].copy()  # 72 x 81: 3 x 3 or 4 x 4 windows
    assert len(plan_windows(72, 81, up.tiles, up.net.align)) >= 9
    for scale in (up.scale, 3):  # the network's, and resized per window
        tiled, whole = up(crop, scale), untiled(up, crop, scale)
        diff = np.abs(tiled.astype(int) - whole)
        assert diff.max() <= 1 and (diff > 0).mean() < 1e-3, (scale, diff.max())


def test_small_overlap_differs_only_near_seams(weights, photo) -> None:
    root, _ = weights
    tiles = TileSettings(96, 4)
    up = BackgroundUpscaler.from_pretrained(root, "realesrgan-x2", tiles=tiles)
    crop = photo[100:300, 250:470].copy()  # 200 x 220
    diff = np.abs(up(crop, 2).astype(int) - untiled(up, crop, 2)).max(axis=2)
    near = np.zeros(crop.shape[:2], bool)  # input pixels within RECEPTIVE of an inner seam
    for w in plan_windows(*crop.shape[:2], tiles, align=2):
        for lo in (w.core_y[0],) if w.core_y[0] else ():
            near[max(0, lo - RECEPTIVE) : lo + RECEPTIVE] = True
        for lo in (w.core_x[0],) if w.core_x[0] else ():
            near[:, max(0, lo - RECEPTIVE) : lo + RECEPTIVE] = True
    near = cv2.resize(near.astype(np.uint8), None, fx=2, fy=2, interpolation=cv2.INTER_NEAREST)
    assert near.any() and not near.all()
    assert diff[near == 0].max() <= 1  # away from seams: the untiled result
    assert diff[near == 1].mean() < 1.0 and diff.max() <= 48  # across them: close


def test_memory_is_bounded_by_the_tile_not_the_photo(weights, photo) -> None:
    root, _ = weights
    tiles = TileSettings(64, 8, batch=2)
    up = BackgroundUpscaler.from_pretrained(root, "realesrgan-x2", tiles=tiles)
    seen: list[tuple[int, ...]] = []
    hook = up.net.module.register_forward_pre_hook(lambda _, args: seen.append(args[0].shape))
    extra = {}
    try:
        for size in ((64, 96), (192, 288)):  # 9x the pixels
            rgb = cv2.resize(photo, size[::-1], interpolation=cv2.INTER_AREA)
            seen.clear()
            tracemalloc.start()
            out = up(rgb, 2)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            extra[size] = peak - out.nbytes  # beyond the output canvas itself
            windows = len(plan_windows(*size, tiles, align=2))
            assert len(seen) == -(-windows // 2) and windows > 2
            assert all(s[0] <= 2 and s[2] <= 64 + 1 and s[3] <= 64 + 1 for s in seen)
    finally:
        hook.remove()
    window_bytes = tiles.batch * (65 * 2) ** 2 * 3
    assert all(e < 6 * window_bytes for e in extra.values()), extra
    assert extra[(192, 288)] < 1.5 * extra[(64, 96)] + window_bytes, extra


# --- whole photos ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def detector(tiny_weights_dir: Path, assets: Path) -> FaceDetector:
    return FaceDetector.load(tiny_weights_dir, "retinaface_mobile0.25", "cpu", threshold=0.97)


def _footprint(affine: np.ndarray, shape: tuple[int, int], scale: int) -> np.ndarray:
    """Where a 512 crop lands in the output: its corners through the inverse affine, x scale."""
    corners = np.array([[0, 0], [FACE_SIZE, 0], [FACE_SIZE, FACE_SIZE], [0, FACE_SIZE]], float)
    inverse = cv2.invertAffineTransform(affine)
    polygon = (corners @ inverse[:, :2].T + inverse[:, 2]) * scale
    mask = np.zeros(shape, np.uint8)
    cv2.fillConvexPoly(mask, np.rint(polygon).astype(np.int32), 1)
    return cv2.dilate(mask, np.ones((5, 5), np.uint8)).astype(bool)


def test_faces_land_at_the_new_scale(weights, photo, detector, tiny_restorer) -> None:
    root, _ = weights
    up = BackgroundUpscaler.from_pretrained(root, "realesrgan-x2", tiles=TileSettings(256, 16))
    part = photo[:, 250:550]  # 300 x 450, one of the collage's faces
    data = cv2.imencode(".png", part[..., ::-1])[1].tobytes()  # BGR for OpenCV
    options = RestoreOptions(background="realesrgan-x2", output_format="png")
    prepared = prepare_photo(data, detector, options, LIMITS)
    assert prepared.options.upscale == 2 and len(prepared.faces) >= 1
    restored = tiny_restorer(prepared.crops).images
    background = make_background(prepared, {"realesrgan-x2": up})
    assert background is not None and prepared.timings["background"] > 0
    plain = background.astype(int)  # finish_photo pastes into `background` itself
    result = finish_photo(prepared, restored, background)
    with Image.open(io.BytesIO(result.data)) as im:
        out = np.asarray(im.convert("RGB")).astype(int)
    assert out.shape == (900, 600, 3) and (result.width, result.height) == (600, 900)
    changed = np.abs(out - plain).max(axis=2) > 8
    inside = np.zeros(changed.shape, bool)
    for affine in prepared.affines:
        inside |= _footprint(affine, changed.shape, 2)
    assert not changed[~inside].any()  # elsewhere: exactly the Real-ESRGAN background
    for face in result.faces:
        x1, y1, x2, y2 = (round(v * 2) for v in face.box)
        assert changed[y1:y2, x1:x2].mean() > 0.8, face.box  # the face, at twice its box


def test_background_not_loaded_is_an_input_error(photo, detector) -> None:
    data = cv2.imencode(".png", photo[:200, :200, ::-1])[1].tobytes()
    prepared = prepare_photo(data, detector, RestoreOptions(background="realesrgan-x4"), LIMITS)
    with pytest.raises(InvalidInputError, match="not loaded"):
        make_background(prepared, {})
    with pytest.raises(InvalidInputError, match="background must be one of"):
        RestoreOptions(background="bicubic").validated()


# --- fetching ----------------------------------------------------------------------------------


def test_fetch_background_names_the_files_and_checks_them(tmp_path: Path, monkeypatch) -> None:
    from model.errors import ChecksumMismatchError, WeightsNotFoundError
    from weights.fetch import fetch, load_manifest, verify

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as err:
        fetch(tmp_path, include_background=True)
    for name in ("RealESRGAN_x2plus.pth", "RealESRGAN_x4plus.pth"):
        assert f"realesrgan/{name}" in str(err.value)
    with pytest.raises(WeightsNotFoundError) as err:
        fetch(tmp_path)
    assert "realesrgan" not in str(err.value)  # only with --background
    entries = [e for e in load_manifest() if e.group == "background"]
    assert len(entries) == 2 and all(e.sha256 and len(e.sha256) == 64 for e in entries)
    write_tiny_realesrgan(tmp_path, "realesrgan-x4")  # not the released bytes
    with pytest.raises(ChecksumMismatchError, match="RealESRGAN_x4plus"):
        verify(tmp_path, entries)
