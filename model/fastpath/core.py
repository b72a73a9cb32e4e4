"""The restorer's fast path: each speed-up is one setting of `FastPathConfig`.

`OSDFaceRestorer.from_pretrained(..., fast=FastPathConfig())` turns it on; `fast=None` keeps the
plain path (modules in one dtype, NCHW, a device sync per stage). Every setting computes the same
function as the plain fp32 path: tests/test_fastpath.py checks each on tiny weights (CPU), and
bench/model.py reports the PSNR of the fast path against fp32 at full size.

What each setting does, and why it is faster:

- `channels_last`: NHWC weights and activations. cuDNN's tensor-core convolutions and oneDNN's
  CPU convolutions work in NHWC; with NCHW tensors every convolution reorders its input and
  output, and GroupNorm/SiLU over NCHW run slower on the CPU.
- `sdpa`: diffusers' PyTorch-SDPA attention processors in the VAE and UNet (flash/memory-efficient
  kernels, no (tokens x tokens) matrix in memory). diffusers picks them by default; the setting
  makes sure no slower processor was left set.
- compute dtype: the restorer's `dtype` (fp16/bf16 on CUDA). Weights are cast once at load rather
  than per call as `torch.autocast` would (the UNet alone is 866 M parameters).
  `decode_dtype="auto"` decodes in bfloat16 when the compute dtype is float16: the VAE decoder's
  activations can exceed fp16's range (65504), bf16 has fp32's range.
- `subpixel_upsample`: the VAE decoder's and UNet's nearest-2x + 3x3 convolution layers run as
  four 2x2 convolutions at the input's resolution (model/fastpath/upsample.py): 2.25x fewer
  multiply-adds in those layers, 208 fewer GMACs per face (9% of 2,318), same function.
- `vre_float32`: the VRE (about 5% of the work) stays in fp32, so the 77 tokens, a discrete choice
  that a rounding can flip, are the fp32 path's; its distances are fp32 in any case.
- `overlap` (CUDA, off by default): the VRE runs on a second stream, concurrently with the VAE
  encoder (the two only share their input). Stage times then come from CUDA events, with no sync
  between stages. On an H200 it was not repeatable with CUDA graphs on; the likely cause (graphs
  captured on one stream share a cuBLAS workspace, see GraphedStage) is fixed, and it stays off
  until tests/test_fastpath.py's repeatability test has passed on a GPU.
- `pin_memory` (CUDA): page-locked host buffers, so copies are asynchronous DMA.
- `cuda_graphs` (CUDA): each stage is captured once per batch size in `batch_sizes` and replayed,
  which removes the launch overhead of the UNet's ~1,500 kernels; other sizes are padded up to
  the next captured size (rows of a batch are independent) or split.
- `compile`: `torch.compile` of the VRE encoder, VAE encoder and decoder, and UNet for the fixed
  512x512 shapes; compiled at warm-up, for each size in `batch_sizes`. With `compile_mode=
  "reduce-overhead"` inductor captures its own CUDA graphs and `cuda_graphs` is not used.
- `cudnn_benchmark` (CUDA): cuDNN times its algorithms once per shape (shapes are fixed).
- `num_threads` (CPU): intra-op threads; None leaves PyTorch's choice (one per core).

On the CPU, PyTorch's allocator returns big activations to the OS after each use and page-faults
them back in; `THP_MEM_ALLOC_ENABLE=1` in the environment (read by PyTorch once, at its first
allocation, so it must be set before the process starts) backs them with 2 MB pages. It is a
process setting, not one of this module's: see docs/performance.md.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from model.errors import InvalidInputError
from model.fastpath.upsample import use_subpixel_upsampling

logger = logging.getLogger(__name__)

CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
DecodeDType = Literal["auto", "float32", "bfloat16", "float16"]
# Modes in which inductor records its own CUDA graphs; ours would capture a capture.
_INDUCTOR_GRAPH_MODES = ("reduce-overhead", "max-autotune")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    """The restorer's speed-ups, each switchable on its own (see the module docstring).

    CUDA-only settings have no effect on the CPU, so one config serves both devices.
    """

    channels_last: bool = True
    sdpa: bool = True
    subpixel_upsample: bool = True
    vre_float32: bool = True
    decode_dtype: DecodeDType = "auto"
    # Off by default: on an H200 (2026-11-27) the side stream gave run-to-run differences and
    # an occasional NaN under the service's threads, likely from the cuBLAS workspace that
    # graphs captured on one stream shared (now one capture stream per stage; see
    # GraphedStage). On again once a GPU run of the repeatability test passes.
    overlap: bool = False
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
        if self.decode_dtype not in ("auto", *_DTYPES):
            raise InvalidInputError(f"unknown decode_dtype {self.decode_dtype!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise InvalidInputError(f"num_threads must be >= 1, got {self.num_threads}")


def resolve_decode_dtype(config: FastPathConfig, dtype: torch.dtype) -> torch.dtype:
    """The VAE decoder's dtype: bf16 instead of fp16 (range), else the compute dtype."""
    if config.decode_dtype != "auto":
        return _DTYPES[config.decode_dtype]
    return torch.bfloat16 if dtype == torch.float16 else dtype


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if (
        t.dim() == 4
        and t.is_contiguous(memory_format=torch.channels_last)
        and not t.is_contiguous()
    ):
        return torch.channels_last
    return torch.contiguous_format


def _padded(t: torch.Tensor, size: int) -> torch.Tensor:
    """A copy of `t` grown to `size` rows by repeating its last row, in `t`'s memory format."""
    out = torch.empty(
        (size, *t.shape[1:]), dtype=t.dtype, device=t.device, memory_format=_memory_format(t)
    )
    out[: t.shape[0]].copy_(t)
    out[t.shape[0] :].copy_(t[-1:].expand(size - t.shape[0], *t.shape[1:]))
    return out


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor


class GraphedStage:
    """CUDA graphs of one stage, one per captured batch size.

    A stage is a function of batch-first tensors returning one batch-first tensor, free of host
    syncs. A call copies its inputs into the graph's static inputs, replays it and returns a copy
    of the static output (the next replay overwrites it). Batches between captured sizes use the
    next larger graph (rows of a batch are independent, so the extra rows only cost time); larger
    batches are split.

    The graphs of one stage share one memory pool and one capture stream: they never run at
    the same time. Stages share neither, because the VRE's graph replays on the side stream
    while the encoder's replays on the main one. Graphs sharing a pool must never run
    concurrently, and nor may graphs captured on one stream: cuBLAS keeps one workspace per
    (handle, stream), and a captured GEMM keeps the address of its capture stream's workspace
    (pytorch/pytorch#193402). Captured on one stream, the VRE's and the encoder's graphs would
    write each other's GEMM workspace when replayed concurrently.
    """

    def __init__(
        self,
        name: str,
        sizes: tuple[int, ...],
        lock: threading.Lock,
        stream: torch.cuda.Stream,
    ):
        self.name = name
        self.sizes = sizes
        self.stream = stream  # warm-up and capture stream, this stage's alone
        self._pool = torch.cuda.graph_pool_handle()
        self._lock = lock
        self._captured: dict[tuple, _Captured] = {}
        self.failed: str | None = None  # why capture failed; the stage then runs eagerly

    def __call__(self, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        if self.failed is not None:
            return fn(*inputs)
        b = inputs[0].shape[0]
        size = next((s for s in self.sizes if s >= b), None)
        if size is None:  # larger than every capture: run in pieces of the largest
            step = self.sizes[-1]
            parts = [self(fn, *(t[i : i + step] for t in inputs)) for i in range(0, b, step)]
            return torch.cat(parts)
        key = (size, *((tuple(t.shape[1:]), t.dtype, _memory_format(t)) for t in inputs))
        with self._lock:
            entry = self._captured.get(key)
            if entry is None:
                try:
                    entry = self._capture(fn, tuple(_padded(t, size) for t in inputs))
                except RuntimeError as exc:
                    # Graphs are an optimisation: the eager stage computes the same numbers.
                    self.failed = f"{type(exc).__name__}: {exc}"
                    logger.warning("CUDA graph of %s failed, running it eagerly: %s",
                                   self.name, self.failed)  # fmt: skip
                    return fn(*inputs)
                self._captured[key] = entry
            for static, t in zip(entry.inputs, inputs, strict=True):
                static[:b].copy_(t)
            entry.graph.replay()
            return entry.output[:b].clone()

    def _capture(self, fn: Callable[..., torch.Tensor], static: tuple[torch.Tensor, ...]):
        current = torch.cuda.current_stream(static[0].device)
        # Warm up outside the capture: cuDNN's autotuning, lazy initialisation and compilation
        # must not happen while the stream is recording.
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            for _ in range(2):
                fn(*static)
        current.wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        start = time.perf_counter()
        with torch.cuda.graph(graph, pool=self._pool, stream=self.stream):
            output = fn(*static)
        logger.info(
            "captured %s for batch %d in %.2f s",
            self.name,
            static[0].shape[0],
            time.perf_counter() - start,
        )
        return _Captured(graph, static, output)


class StageClock:
    """Seconds per stage of one call.

    Plain path: the wall clock with a device sync after each stage (the lead's behaviour). Fast
    path on CUDA: CUDA events on the stage's stream, read once at the end, so stages can overlap
    and the host can queue the next stage while the device works.
    """

    def __init__(self, device: torch.device, *, events: bool, side: torch.cuda.Stream | None):
        self.device = device
        self.events = events and device.type == "cuda"
        self.side = side
        self._seconds: dict[str, float] = {}
        self._spans: dict[str, tuple[torch.cuda.Event, torch.cuda.Event]] = {}

    @contextmanager
    def __call__(self, stage: str, *, side: bool = False) -> Iterator[None]:
        if not self.events:
            start = time.perf_counter()
            yield
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self._seconds[stage] = time.perf_counter() - start
            return
        main = torch.cuda.current_stream(self.device)
        stream = self.side if side and self.side is not None else main
        if stream is not main:
            stream.wait_stream(main)  # its inputs were produced on the main stream
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(stream):
            begin.record(stream)
            yield
            end.record(stream)
        self._spans[stage] = (begin, end)

    def seconds(self) -> dict[str, float]:
        for stage, (begin, end) in self._spans.items():
            end.synchronize()
            self._seconds[stage] = begin.elapsed_time(end) / 1e3
        return dict(self._seconds)


def _place(module: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool):
    # nn.Module.to, not diffusers' override (which warns about fp32-kept modules SD has none of).
    module = nn.Module.to(module, device=device, dtype=dtype)
    if channels_last and device.type == "cpu":
        _own_copies_nhwc(module)
    elif channels_last:
        module = nn.Module.to(module, memory_format=torch.channels_last)
    return module.eval().requires_grad_(False)


@torch.no_grad()
def _own_copies_nhwc(module: nn.Module) -> None:
    """Copy every CPU tensor once: 4-D ones to NHWC, the others as they are.

    Tensors loaded from safetensors are views of one mmap of the file. Converting only the 4-D
    weights would leave the others holding the whole mapping, and with it every page already
    read, resident beside the copies (+3 GiB at full size); copying all releases it.
    """
    for t in (*module.parameters(), *module.buffers()):
        fmt = torch.channels_last if t.dim() == 4 else torch.contiguous_format
        t.data = t.data.clone(memory_format=fmt)


@dataclass
class FastPath:
    """The fast path of one restorer; `config=None` is the plain path, unchanged."""

    config: FastPathConfig | None
    device: torch.device
    dtype: torch.dtype
    vre_dtype: torch.dtype = field(init=False)
    decode_dtype: torch.dtype = field(init=False)

    def __post_init__(self) -> None:
        c, cuda = self.config, self.device.type == "cuda"
        self.vre_dtype = torch.float32 if c is not None and c.vre_float32 else self.dtype
        self.decode_dtype = self.dtype if c is None else resolve_decode_dtype(c, self.dtype)
        self.channels_last = c is not None and c.channels_last
        self.pin = c is not None and c.pin_memory and cuda
        self._streams: set[int] = set()  # cuda_stream handles this path already uses
        overlap = c is not None and c.overlap and cuda
        self.side = self._distinct_stream() if overlap else None
        inductor_graphs = c is not None and c.compile and c.compile_mode in _INDUCTOR_GRAPH_MODES
        self.graphs = c is not None and c.cuda_graphs and cuda and not inductor_graphs
        self._lock = threading.Lock()
        self._stages: dict[str, GraphedStage] = {}

    def _distinct_stream(self) -> torch.cuda.Stream:
        """A stream none of this path's other streams share.

        torch.cuda.Stream() hands out streams round-robin from a fixed pool, so two calls can
        return the same stream; the side stream and each stage's capture stream must differ
        (see GraphedStage).
        """
        while True:
            stream = torch.cuda.Stream(self.device)
            if stream.cuda_stream not in self._streams:
                self._streams.add(stream.cuda_stream)
                return stream

    @property
    def enabled(self) -> bool:
        return self.config is not None

    # --- load time ------------------------------------------------------------------------

    def place(self, module: nn.Module, dtype: torch.dtype) -> nn.Module:
        self._reshape_upsamplers(module)
        return _place(module, self.device, dtype, self.channels_last)

    def place_vae(self, vae: nn.Module) -> nn.Module:
        """Encoder side in the compute dtype, decoder side in `decode_dtype`, each cast once."""
        self._reshape_upsamplers(vae)
        decoder_side = ("decoder", "post_quant_conv")
        for name, child in vae.named_children():
            dtype = self.decode_dtype if name in decoder_side else self.dtype
            _place(child, self.device, dtype, self.channels_last)
        return vae.eval().requires_grad_(False)

    def _reshape_upsamplers(self, module: nn.Module) -> None:
        # Before the cast: the summed kernels are rounded once, from the loaded weights.
        if self.config is not None and self.config.subpixel_upsample:
            replaced = use_subpixel_upsampling(module)
            if replaced:
                logger.info(
                    "%s: %d upsampling layers run subpixel", type(module).__name__, replaced
                )

    def prepare(self, vre: nn.Module, vae: nn.Module, unet: nn.Module) -> None:
        """Process-wide backend settings, attention processors and compilation."""
        c = self.config
        if c is None:
            return
        if self.device.type == "cuda" and c.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True  # process-wide; shapes are fixed
        if self.device.type == "cpu" and c.num_threads is not None:
            torch.set_num_threads(c.num_threads)  # process-wide
        if c.sdpa:
            from diffusers.models.attention_processor import AttnProcessor2_0

            for model in (vae, unet):
                model.set_attn_processor(AttnProcessor2_0())
        if c.compile:
            # In place (nn.Module.compile), so the attributes keep their types. Batch sizes
            # recompile once with a dynamic batch dimension (automatic dynamic shapes).
            for part in (vre.encoder, vae.encoder, vae.decoder, unet):
                part.compile(mode=c.compile_mode, fullgraph=False)

    def warmup_sizes(self, batch_size: int) -> tuple[int, ...]:
        """Sizes to run at warm-up: every captured/compiled size, else the one asked for."""
        c = self.config
        if c is not None and (self.graphs or c.compile):
            return tuple(sorted({*c.batch_sizes, batch_size}))
        return (batch_size,)

    def describe(self) -> dict:
        if self.config is None:
            return {"enabled": False}
        return {
            "enabled": True,
            "channels_last": self.channels_last,
            "subpixel_upsample": self.config.subpixel_upsample,
            "vre_dtype": str(self.vre_dtype).removeprefix("torch."),
            "decode_dtype": str(self.decode_dtype).removeprefix("torch."),
            "overlap": self.side is not None,
            "pin_memory": self.pin,
            "cuda_graphs": self.graphs,
            "graph_failures": {k: v.failed for k, v in self._stages.items() if v.failed},
            "compile": self.config.compile and self.config.compile_mode,
            "batch_sizes": list(self.config.batch_sizes),
        }

    # --- per call -------------------------------------------------------------------------

    def clock(self) -> StageClock:
        return StageClock(self.device, events=self.enabled, side=self.side)

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) [0, 1] on any device -> on this device; fast: float32, NHWC if set."""
        if not self.enabled:
            return images.to(self.device, self.dtype, non_blocking=True)
        if self.pin and images.device.type == "cpu" and not images.is_pinned():
            images = images.pin_memory()
        x = images.to(self.device, torch.float32, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def run(
        self, stage: str, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor, graph: bool = True
    ) -> torch.Tensor:
        """`fn(*inputs)`, replayed from a CUDA graph when graphs are on and `graph` allows."""
        if not (self.graphs and graph):
            return fn(*inputs)
        graphed = self._stages.get(stage)
        if graphed is None:
            with self._lock:
                graphed = self._stages.get(stage)
                if graphed is None:
                    graphed = GraphedStage(
                        stage, self.config.batch_sizes, self._lock, self._distinct_stream()
                    )
                    self._stages[stage] = graphed
        return graphed(fn, *inputs)

    def join(self, t: torch.Tensor) -> torch.Tensor:
        """Make the main stream wait for a tensor produced on the side stream."""
        if self.side is None:
            return t
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self.side)
        t.record_stream(main)  # the allocator must not hand its memory to the side stream early
        return t

    def to_host(self, out: torch.Tensor) -> torch.Tensor:
        """Device output -> float32 NCHW on the CPU (through pinned memory when set)."""
        if not self.enabled:
            return out.float().cpu()
        out = out.float().contiguous()
        if not self.pin:
            return out.cpu()
        host = torch.empty(out.shape, dtype=torch.float32, pin_memory=True)
        host.copy_(out, non_blocking=True)
        torch.cuda.current_stream(self.device).synchronize()
        return host
