"""`osdface restore`: the command (`command.py`: flags and checks), the plan of inputs and
outputs (`plan.py`), the local run (`runners.py`, `video.py`), what it tells (`reporting.py`),
and the same plan on a Ray cluster (`ray_driver.py`, `ray_stages.py`, `uris.py`)."""
