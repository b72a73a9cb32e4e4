"""Video in, video out with PyAV.

- `config.py`: video file suffixes and the defaults the CLI and the service share;
- `io.py`: streaming decode (`VideoSource`) and atomic encode with audio remux (`VideoSink`);
- `track.py`: faces followed across frames, landmarks smoothed per track;
- `restore.py`: `restore_video`, faces of many frames per restorer call;
- `segments.py`: one range restored as segments of whole windows (resumable), then joined.
"""
