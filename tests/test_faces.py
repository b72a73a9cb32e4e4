"""Face detection (real RetinaFace mobile0.25 weights), alignment and paste-back geometry."""

from __future__ import annotations

import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import get_args

import cv2
import numpy as np
import pytest
import torch
from facexlib.detection.retinaface import generate_config
from facexlib.detection.retinaface_utils import PriorBox

from model.config import DetectorConfig, DetectorName
from model.errors import (
    ChecksumMismatchError,
    InvalidInputError,
    StateDictMismatchError,
    WeightsError,
    WeightsNotFoundError,
)
from model.media.faces.align import FACE_SIZE, FFHQ_TEMPLATE_512, align_face, similarity_transform
from model.media.faces.detect import (
    DETECTORS,
    DetectedFace,
    FaceDetector,
    _priors,
    load_detector_state,
    select_faces,
)
from model.media.faces.paste import canvas_to_crop, paste_faces, paste_mask
from service.settings import Settings
from tests.photo_variants import MOBILE_FILE, WHOLE_PHOTOS, detector_weights_dir, load_rgb
from weights.layout import sha256_file

MOBILE = "retinaface_mobile0.25"


@pytest.fixture(scope="module")
def weights_dir(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return detector_weights_dir(assets, tmp_path_factory.mktemp("detector-weights"))


@pytest.fixture(scope="module")
def detector(weights_dir: Path) -> FaceDetector:
    return FaceDetector.load(weights_dir, MOBILE, "cpu", threshold=0.97)


@pytest.fixture(scope="module")
def photos(assets: Path) -> dict[str, np.ndarray]:
    return {name: load_rgb(assets / "images" / name) for name in WHOLE_PHOTOS}


def _crops(assets: Path) -> list[Path]:
    return sorted((assets / "images").glob("*/cropped_faces/*.png"))


# --- loading -------------------------------------------------------------------------------


def test_sha256_constants_match_the_assets_readme(assets: Path) -> None:
    assert sha256_file(assets / "detectors" / MOBILE_FILE) == DETECTORS[MOBILE].sha256


def test_missing_weights(tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError, match=re.escape(MOBILE_FILE)):
        FaceDetector.load(tmp_path, MOBILE)


def test_lookalike_file_is_refused(assets: Path, tmp_path: Path) -> None:
    (tmp_path / "facexlib").mkdir()
    fake = tmp_path / "facexlib" / MOBILE_FILE
    shutil.copyfile(assets / "detectors" / MOBILE_FILE, fake)
    with fake.open("r+b") as f:  # same name, same size, one byte different
        f.seek(-100, 2)
        byte = f.read(1)
        f.seek(-100, 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ChecksumMismatchError):
        FaceDetector.load(tmp_path, MOBILE)


def test_unknown_detector_name(weights_dir: Path) -> None:
    with pytest.raises(InvalidInputError, match="retinaface_resnet50"):
        FaceDetector.load(weights_dir, "yolo")


def test_detector_names_and_defaults_have_one_source(weights_dir: Path) -> None:
    """Every name settings and the CLI accept is loadable; both start from DetectorConfig."""
    assert set(get_args(DetectorName)) == set(DETECTORS)
    assert DetectorConfig().name in DETECTORS
    fields = ("detector", "detect_threshold", "detect_max_side", "min_face_size")
    assert tuple(Settings.model_fields[f].default for f in fields) == (
        DetectorConfig.name,
        DetectorConfig.threshold,
        DetectorConfig.max_side,
        DetectorConfig.min_face_size,
    )
    config = DetectorConfig(name=MOBILE, threshold=0.9, max_side=640, min_face_size=20)
    described = FaceDetector.from_config(weights_dir, config).describe()
    assert (described["threshold"], described["max_side"], described["min_face_size"]) == (
        0.9,
        640,
        20,
    )


def test_state_dict_loading_is_strict_and_strips_module_prefix(
    assets: Path, tmp_path: Path
) -> None:
    state = torch.load(assets / "detectors" / MOBILE_FILE, map_location="cpu", weights_only=True)
    # Files saved from nn.DataParallel carry a `module.` prefix; it is stripped on load.
    prefixed = tmp_path / "prefixed.pth"
    torch.save({f"module.{k.removeprefix('module.')}": v for k, v in state.items()}, prefixed)
    loaded = load_detector_state(prefixed, sha256_file(prefixed))
    assert not any(k.startswith("module.") for k in loaded)
    FaceDetector.from_state_dict(loaded, MOBILE)  # loads strictly

    missing = dict(loaded)
    dropped = sorted(missing)[3]
    del missing[dropped]
    with pytest.raises(StateDictMismatchError, match=dropped.replace(".", r"\.")):
        FaceDetector.from_state_dict(missing, MOBILE)
    with pytest.raises(StateDictMismatchError, match="missing"):
        FaceDetector.from_state_dict(loaded, "retinaface_resnet50")


def test_pickled_objects_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"weight": torch.zeros(1), "object": Path("not a tensor")}, path)
    with pytest.raises(WeightsError):
        load_detector_state(path, sha256_file(path))


# --- detection -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(333, 517), (512, 512), (450, 800)])
def test_priors_match_facexlib(size: tuple[int, int]) -> None:
    config = generate_config("mobile0.25")
    reference = PriorBox(config, image_size=size).forward()
    steps = tuple(config["steps"])
    min_sizes = tuple(tuple(s) for s in config["min_sizes"])
    torch.testing.assert_close(_priors(*size, steps, min_sizes), reference)


def test_detection_matches_facexlib_reference(
    detector: FaceDetector, photos: dict[str, np.ndarray]
) -> None:
    """Our stateless pre/post-processing around the network equals facexlib's own, at full size."""
    rgb = photos["vqfr/whole_imgs/example.jpg"]
    full_size = FaceDetector(detector.network, MOBILE, threshold=0.97, max_side=4096, min_side=0)
    ours = full_size.detect(rgb)
    with torch.no_grad():  # facexlib's method: BGR input, stateful, used here as the reference
        reference = detector.network.detect_faces(rgb[..., ::-1].copy(), conf_threshold=0.97)
    reference = reference[np.argsort(-reference[:, 4])]
    assert len(ours) == len(reference) == 3
    for face, row in zip(ours, reference, strict=True):
        np.testing.assert_allclose(face.box, row[:4], atol=1e-3)
        np.testing.assert_allclose(face.landmarks_array().ravel(), row[5:15], atol=1e-3)
        assert face.score == pytest.approx(float(row[4]), abs=1e-5)


@pytest.mark.parametrize("name", sorted(WHOLE_PHOTOS))
def test_face_counts_match_the_readme(
    detector: FaceDetector, photos: dict[str, np.ndarray], name: str
) -> None:
    faces = detector.detect(photos[name])
    assert len(faces) == WHOLE_PHOTOS[name]
    height, width = photos[name].shape[:2]
    for face in faces:
        x1, y1, x2, y2 = face.box
        assert 0 <= x1 < x2 <= width + 5 and 0 <= y1 < y2 <= height + 5
        assert face.score > 0.97
        left_eye, right_eye, nose, mouth_left, mouth_right = face.landmarks_array()
        assert left_eye[0] < right_eye[0] and mouth_left[0] < mouth_right[0]
        assert max(left_eye[1], right_eye[1]) < nose[1] < min(mouth_left[1], mouth_right[1])


def test_every_aligned_crop_has_exactly_one_face(detector: FaceDetector, assets: Path) -> None:
    crops = _crops(assets)
    assert len(crops) == 15
    counts = {path.name: len(detector.detect(load_rgb(path))) for path in crops}
    assert counts == dict.fromkeys(counts, 1)


def test_downscaled_detection_maps_back(
    detector: FaceDetector, photos: dict[str, np.ndarray]
) -> None:
    rgb = photos["gfpgan/whole_imgs/Blake_Lively.jpg"]  # 700 px wide
    full = FaceDetector(detector.network, MOBILE, max_side=2048).detect(rgb)
    half = FaceDetector(detector.network, MOBILE, max_side=350).detect(rgb)
    assert len(full) == len(half) == 2
    for a, b in zip(full, half, strict=True):
        size = np.sqrt(a.area)
        assert np.abs(np.subtract(a.box, b.box)).max() < 0.1 * size
        assert np.abs(a.landmarks_array() - b.landmarks_array()).max() < 0.1 * size


def test_threshold_and_min_face_size(detector: FaceDetector, photos: dict[str, np.ndarray]) -> None:
    rgb = photos["gfpgan/whole_imgs/10045.png"]  # faces about 80 px
    assert FaceDetector(detector.network, MOBILE, min_face_size=200).detect(rgb) == []
    strict = FaceDetector(detector.network, MOBILE, threshold=0.9993).detect(rgb)
    assert 0 < len(strict) < 3
    with pytest.raises(InvalidInputError):
        FaceDetector(detector.network, MOBILE, threshold=1.5)
    with pytest.raises(InvalidInputError):
        detector.detect(rgb[..., 0])


def test_concurrent_threads_get_their_own_results(
    detector: FaceDetector, photos: dict[str, np.ndarray]
) -> None:
    names = ["vqfr/whole_imgs/example.jpg", "gfpgan/whole_imgs/Blake_Lively.jpg"] * 2
    sequential = [detector.detect(photos[n]) for n in names[:2]]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(lambda n: detector.detect(photos[n]), names))
    for got, want in zip(concurrent, sequential * 2, strict=True):
        assert len(got) == len(want)
        for a, b in zip(got, want, strict=True):
            np.testing.assert_allclose(a.box, b.box, atol=1e-3)


def test_select_faces() -> None:
    def face(x: float, y: float, size: float) -> DetectedFace:
        box = (x - size / 2, y - size / 2, x + size / 2, y + size / 2)
        return DetectedFace(box, tuple([(x, y)] * 5), 0.99)

    faces = [face(100, 100, 50), face(500, 300, 30), face(800, 100, 80)]
    assert select_faces(faces, 1000, 600) == [faces[2], faces[0], faces[1]]  # largest first
    assert select_faces(faces, 1000, 600, only_center_face=True) == [faces[1]]
    assert select_faces(faces, 1000, 600, max_faces=2) == [faces[2], faces[0]]
    assert select_faces([], 1000, 600, only_center_face=True) == []
    # Indices count in the largest-first order, after the size filter; past the end: ignored.
    assert select_faces(faces, 1000, 600, indices=[0, 2, 9]) == [faces[2], faces[1]]
    assert select_faces(faces, 1000, 600, min_face_size=40) == [faces[2], faces[0]]
    assert select_faces(faces, 1000, 600, min_face_size=40, indices=[1]) == [faces[0]]


def test_small_photo_faces_are_found(detector: FaceDetector, photos: dict[str, np.ndarray]) -> None:
    """A 200 px wide copy of a 3-face photo (faces about 20 px): detected on an upscaled copy,
    boxes mapped back onto the small photo where the full-size detection puts them."""
    full = photos["gfpgan/whole_imgs/10045.png"]  # 783x1146, 3 faces
    scale = 200 / full.shape[1]  # faces of about 20 px
    small = cv2.resize(full, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
    reference = sorted(detector.detect(full), key=lambda f: f.box[0])
    found = sorted(detector.detect(small), key=lambda f: f.box[0])
    assert len(reference) == len(found) == 3
    for big, tiny in zip(reference, found, strict=True):
        side = np.sqrt(tiny.area)
        assert np.abs(np.multiply(big.box, scale) - tiny.box).max() < 0.25 * side
    # At its own size the same detector misses faces.
    assert len(FaceDetector(detector.network, MOBILE, min_side=0).detect(small)) < 3


# --- alignment -----------------------------------------------------------------------------


def _similarity(angle_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    a = np.radians(angle_deg)
    rotation = scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.hstack([rotation, [[tx], [ty]]])


def test_similarity_transform_recovers_a_known_one() -> None:
    truth = _similarity(23.0, 0.37, 120.5, -44.0)
    src = np.random.default_rng(0).uniform(0, 800, (5, 2))
    dst = src @ truth[:, :2].T + truth[:, 2]
    np.testing.assert_allclose(similarity_transform(src, dst), truth, atol=1e-9)
    # OpenCV's robust estimator agrees on exact points.
    opencv, _ = cv2.estimateAffinePartial2D(src, dst, method=cv2.LMEDS)
    np.testing.assert_allclose(similarity_transform(src, dst), opencv, atol=1e-6)


def test_similarity_transform_never_reflects() -> None:
    mirrored = FFHQ_TEMPLATE_512 * [-1, 1] + [512, 0]
    fitted = similarity_transform(mirrored, FFHQ_TEMPLATE_512)
    assert np.linalg.det(fitted[:, :2]) > 0


def test_align_face_with_exact_landmarks(assets: Path) -> None:
    """Warp a reference aligned crop into a photo with a known transform; aligning the photo with
    the template points carried along must give back that crop and the inverse transform."""
    crop = load_rgb(assets / "images/gfpgan/cropped_faces/Adele_crop.png")
    to_photo = _similarity(-31.0, 0.7, 400.0, 150.0)
    photo = cv2.warpAffine(crop, to_photo, (1000, 800), flags=cv2.INTER_CUBIC)
    landmarks = FFHQ_TEMPLATE_512 @ to_photo[:, :2].T + to_photo[:, 2]
    realigned, affine = align_face(photo, landmarks)
    expected = cv2.invertAffineTransform(to_photo)
    np.testing.assert_allclose(affine, expected, atol=1e-9)
    inner = slice(64, 448)  # away from the filled border
    error = np.abs(realigned[inner, inner].astype(int) - crop[inner, inner]).mean()
    assert error < 6  # two resamplings at 0.7x


def test_border_face_crop_shows_no_mirrored_features(assets: Path) -> None:
    """A face cut through the nose by the photo's left edge: the crop's part outside the photo
    must not mirror the part inside (a reflected half-face shows the restorer a third eye)."""
    crop = load_rgb(assets / "images/gfpgan/cropped_faces/Adele_crop.png")
    cut = 256
    photo = np.ascontiguousarray(crop[:, cut:])  # the face's left half is outside the photo
    realigned, _ = align_face(photo, FFHQ_TEMPLATE_512 - [cut, 0])
    np.testing.assert_array_equal(realigned[:, cut + 2 :], crop[:, cut + 2 :])  # inside: as is
    reflected = cv2.warpAffine(  # the old fill, as the independent reference
        photo,
        np.array([[1.0, 0, -cut], [0, 1.0, 0]]),
        (FACE_SIZE, FACE_SIZE),
        flags=cv2.INTER_CUBIC | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REFLECT_101,
    )

    def mirror_correlation(image: np.ndarray) -> float:
        grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)
        detail = grey - cv2.GaussianBlur(grey, (0, 0), 4.0)  # features, not the mean colour
        width = 160
        # 16..160 px from the edge, where a mirror would put the other eye and cheek.
        outside = detail[:, cut - width : cut - 16]
        mirrored = detail[:, cut + 16 : cut + width][:, ::-1]  # the inside, flipped
        return float(np.corrcoef(outside.ravel(), mirrored.ravel())[0, 1])

    assert mirror_correlation(reflected) > 0.9  # the test sees a mirror when there is one
    assert abs(mirror_correlation(realigned)) < 0.2
    # Far outside, the fill has faded to one flat colour.
    assert realigned[:, :8].reshape(-1, 3).std(axis=0).max() < 3.0


def test_realigned_faces_land_on_the_template(
    detector: FaceDetector, photos: dict[str, np.ndarray], assets: Path
) -> None:
    """Re-detect on our aligned crops: landmarks fall on the template as closely as this detector
    manages on the reference crops (aligned by GFPGAN's pipeline). mobile0.25's own landmark
    noise on 512 px faces is about 10 px, so that is the yardstick, not zero."""
    # Crops measured at their own size (no small-photo upscale), like the reference crops.
    lenient = FaceDetector(detector.network, MOBILE, threshold=0.5, min_side=0)

    def error(rgb: np.ndarray) -> float:
        faces = lenient.detect(rgb)  # the most confident one: 0.5 lets in some non-faces
        assert faces
        return float(np.linalg.norm(faces[0].landmarks_array() - FFHQ_TEMPLATE_512, axis=1).mean())

    reference = [error(load_rgb(p)) for p in _crops(assets)]
    ours = []
    for rgb in photos.values():
        for face in detector.detect(rgb):
            crop, _ = align_face(rgb, face.landmarks_array())
            ours.append(error(crop))
    print(
        f"landmark error on crops, px: ours {np.mean(ours):.1f} (max {max(ours):.1f}), "
        f"reference {np.mean(reference):.1f} (max {max(reference):.1f})"
    )
    assert len(ours) == sum(WHOLE_PHOTOS.values())
    assert np.mean(ours) <= np.mean(reference) + 3.0
    assert max(ours) < 30.0


# --- paste-back ----------------------------------------------------------------------------


def test_paste_mask_is_zero_on_the_crop_edge_and_one_inside() -> None:
    mask = paste_mask()
    assert mask.shape == (FACE_SIZE, FACE_SIZE)
    edge = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
    assert edge.max() == 0.0
    assert mask[100:412, 100:412].min() > 0.999
    assert np.allclose(mask, mask[::-1]) and np.allclose(mask, mask.T)


def test_canvas_to_crop_matches_resize_convention() -> None:
    """Canvas pixel centres of an x-times upscale land where cv2.resize samples them from."""
    affine = _similarity(0.0, 1.0, 0.0, 0.0)
    ramp = np.tile(np.arange(64, dtype=np.float32), (64, 1))
    big = cv2.resize(ramp, (192, 192), interpolation=cv2.INTER_LINEAR)
    sampled = cv2.warpAffine(
        ramp,
        canvas_to_crop(affine, 3),
        (192, 192),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )
    np.testing.assert_allclose(sampled, big, atol=1e-4)


def test_paste_strength_zero_and_off_canvas_leave_canvas_unchanged(assets: Path) -> None:
    canvas = load_rgb(assets / "images/vqfr/whole_imgs/example.jpg")
    face = np.full((FACE_SIZE, FACE_SIZE, 3), 0.5, np.float32)
    inside = _similarity(0.0, 2.0, -300.0, -100.0)  # photo -> crop: a 256 px face region
    off_canvas = _similarity(0.0, 1.0, 5000.0, 5000.0)
    out = paste_faces(canvas.copy(), [face], [inside], strength=0.0)
    np.testing.assert_array_equal(out, canvas)
    out = paste_faces(canvas.copy(), [face], [off_canvas])
    np.testing.assert_array_equal(out, canvas)
    out = paste_faces(canvas.copy(), [face], [inside])
    centre = out[50 + 128 - 20 : 50 + 128 + 20, 150 + 128 - 20 : 150 + 128 + 20]
    assert np.all(np.abs(centre - 127.5) <= 0.5)  # 0.5 * 255, rounded either way
    with pytest.raises(InvalidInputError):
        paste_faces(canvas.copy(), [face, face], [inside])
