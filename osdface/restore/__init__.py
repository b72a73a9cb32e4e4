"""`osdface restore`: the command (`command.py`: the flags of `flags.py` read once into the
frozen `RunConfig` of `config.py`, the checks of `checks.py`), the one plan of inputs and
outputs (`plan.py`), the local run (`runners.py`, `video.py`), what it tells (`reporting.py`),
and the same plan on a Ray cluster (`ray_driver.py`, `ray_stages.py`, `uris.py`)."""
