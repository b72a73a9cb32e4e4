"""Phone photos: HEIC/HEIF through pillow-heif, AVIF through Pillow's own plugin.

Both are ISO-BMFF files: an `ftyp` box whose brands say what is inside. pillow-heif (libheif)
applies the container's rotation (`irot`/`imir`) while decoding and resets the EXIF orientation
to 1, so the pixels come out upright either way; Pillow's AVIF plugin keeps the EXIF tag, which
the decoder then applies like any other format's.

Which of them can also be *written* depends on the build (libheif's HEVC encoder, Pillow's
libavif); `writable_formats()` says, and the pipeline falls back to PNG when the input's format
cannot be written back.
"""

from __future__ import annotations

import functools
import logging
import struct

from PIL import Image

logger = logging.getLogger(__name__)

# Major or compatible brands of the ftyp box.
HEIC_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx"})
AVIF_BRANDS = frozenset({b"avif", b"avis"})
GENERIC_BRANDS = frozenset({b"mif1", b"msf1"})  # image / sequence, codec named elsewhere
MAX_FTYP_BYTES = 4096


def sniff_bmff(data: bytes) -> str | None:
    """'heic' or 'avif' from an ISO-BMFF `ftyp` box at the start of `data`, else None.

    AVIF wins when its brand appears anywhere (AVIF files also list mif1/miaf); a file whose
    brands are only the generic mif1/msf1 is treated as HEIF, which pillow-heif reads.
    """
    if len(data) < 16 or data[4:8] != b"ftyp":
        return None
    size = struct.unpack(">I", data[:4])[0]
    if size < 16 or size > MAX_FTYP_BYTES:
        return None
    box = data[8 : min(size, len(data))]
    brands = {box[0:4]} | {box[i : i + 4] for i in range(8, len(box) - 3, 4)}
    if brands & AVIF_BRANDS:
        return "avif"
    if brands & (HEIC_BRANDS | GENERIC_BRANDS):
        return "heic"
    return None


@functools.cache
def register_heif() -> bool:
    """Make Pillow open (and, with an encoder, save) HEIF through pillow-heif; once."""
    try:
        import pillow_heif
    except ImportError:
        logger.warning("pillow-heif is not installed: HEIC/HEIF input is refused")
        return False
    pillow_heif.register_heif_opener()
    return True


@functools.cache
def writable_formats() -> frozenset[str]:
    """Formats this build can encode: always jpeg, png, webp; heic and avif when present."""
    formats = {"jpeg", "png", "webp"}
    if register_heif():
        import pillow_heif

        if pillow_heif.libheif_info().get("HEIF"):  # the name of its HEVC encoder, or ""
            formats.add("heic")
    Image.init()
    if "AVIF" in Image.SAVE:
        formats.add("avif")
    return frozenset(formats)


def readable(fmt: str) -> bool:
    """True when `fmt` ('heic' / 'avif') can be decoded in this build."""
    if fmt == "heic":
        return register_heif()
    Image.init()
    return fmt != "avif" or "AVIF" in Image.OPEN
