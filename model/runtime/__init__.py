"""What a run of the model needs, below every front end: the settings (`settings.py`, no torch)
and the loaders that turn them into objects (`load.py`: restorer, detector, fast path, limits,
background networks). The service, the command line and the Ray workers all read these."""
