"""Faces in whole photos: detection (detect.py), alignment to the FFHQ template (align.py),
paste-back (paste.py)."""
