"""Pictures around the networks: image files (`codecs/`), faces (`faces/`: detect, align, paste),
whole photos (`pipeline.py`) and videos (`video/`)."""
