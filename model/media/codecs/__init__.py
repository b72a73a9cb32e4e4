"""Image files in and out: sniffing and limits (formats.py), decoding to RGB uint8 (decode.py),
writing back faithfully (encode.py).

Everything inside the model works on `(H, W, 3)` uint8 RGB with the EXIF orientation already
applied. This module is the one place that knows about files, and it keeps what is needed to
give the user back the kind of file they sent:

- alpha is split off before processing and re-attached unchanged (resized when upscaled);
- grey input (`1`, `L`, `LA`, 16-bit grey) is processed as RGB with equal channels and written
  back grey;
- 16-bit PNGs are processed in 8 bits and written back in 16 bits: unchanged pixels keep their
  exact 16-bit values, changed ones get the 8-bit change added to the 16-bit original;
- palette (`P`) input comes back as RGB, or RGBA when the palette has transparency;
- CMYK JPEGs are converted to sRGB (through their ICC profile when they carry one) and come back
  as RGB JPEGs with an sRGB profile;
- the ICC profile and EXIF (minus the orientation tag, which has been applied) are written back.

Decoding is guarded: the byte count is checked before anything is parsed, the pixel count from
the header before any pixel is decoded, and Pillow's own decompression-bomb guard is set too.
"""
