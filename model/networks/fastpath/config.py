"""The fast path's settings, one frozen dataclass (what each does: fastpath/__init__.py).

Free of torch, so the service's settings read their defaults from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, get_args

from model.config import CompileMode, DType
from model.errors import InvalidInputError

# Modes in which inductor records its own CUDA graphs; ours would capture a capture.
INDUCTOR_GRAPH_MODES: Final[tuple[CompileMode, ...]] = ("reduce-overhead", "max-autotune")


def batch_sizes_up_to(largest: int) -> tuple[int, ...]:
    """Powers of two below `largest`, and `largest`: the sizes a batcher of that limit mostly
    produces, each captured once; other sizes pad up to the next one (at most 2x the work)."""
    if largest < 1:
        raise InvalidInputError(f"largest batch must be >= 1, got {largest}")
    sizes = {largest}
    size = 1
    while size < largest:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


@dataclass(frozen=True)
class FastPathConfig:
    """The restorer's speed-ups, each switchable on its own (see fastpath/__init__.py).

    CUDA-only settings have no effect on the CPU, so one config serves both devices.
    """

    channels_last: bool = True
    sdpa: bool = True
    subpixel_upsample: bool = True
    vre_float32: bool = True
    # "auto": bfloat16 when the compute dtype is float16 (range), else the compute dtype.
    decode_dtype: DType = "auto"
    # Off by default: on an H200 the side stream gave run-to-run differences and an occasional
    # NaN under the service's threads, likely from a cuBLAS workspace shared by graphs captured
    # on one stream (each stage has its own capture stream: graphs.GraphedStage). To be turned
    # on once a GPU run of tests/test_fastpath.py's repeatability test passes.
    overlap: bool = False
    # The thread that calls the restorer (the service's model worker) queues its work on a CUDA
    # stream of its own, so other threads' work on the default stream (the face detector's
    # copies and syncs) does not wait behind a batch. A switch so bench/gpu.sh can measure both.
    worker_stream: bool = True
    pin_memory: bool = True
    cuda_graphs: bool = True
    cudnn_benchmark: bool = True
    compile: bool = False
    compile_mode: CompileMode = "default"
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8)
    num_threads: int | None = None

    def __post_init__(self) -> None:
        sizes = tuple(sorted(set(self.batch_sizes)))
        if not sizes or sizes[0] < 1:
            raise InvalidInputError(f"batch_sizes must be positive, got {self.batch_sizes}")
        object.__setattr__(self, "batch_sizes", sizes)
        if self.decode_dtype not in get_args(DType):
            raise InvalidInputError(f"unknown decode_dtype {self.decode_dtype!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise InvalidInputError(f"num_threads must be >= 1, got {self.num_threads}")

    def uses_cuda_graphs(self, device_type: str) -> bool:
        """Our CUDA graphs: on CUDA, unless inductor captures its own."""
        inductor_graphs = self.compile and self.compile_mode in INDUCTOR_GRAPH_MODES
        return self.cuda_graphs and device_type == "cuda" and not inductor_graphs
