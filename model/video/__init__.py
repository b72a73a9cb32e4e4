"""Video in, video out with PyAV.

- `formats.py`: which file names are video (imports nothing heavy);
- `io.py`: streaming decode (`VideoSource`) and atomic encode with audio remux (`VideoSink`);
- `track.py`: faces followed across frames, landmarks smoothed per track;
- `restore.py`: `restore_video`, faces of many frames per restorer call.
"""
