"""CUDA graphs and torch.compile: each wraps a network's call once, at load.

`install_cuda_graphs` replaces `vre.forward`, `vae.encode`, `vae.decode` and `unet.forward` by
callables that replay a CUDA graph of the original call (captured per batch size on first use),
so the restorer's call reads the same with or without them. `compile_networks` compiles the
heavy parts in place; with both on, the graphs replay the compiled code.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKLOutput
from diffusers.models.autoencoders.vae import DecoderOutput, DiagonalGaussianDistribution
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from torch import nn

from model.networks.fastpath.config import CompileMode
from model.networks.fastpath.flags import cudnn_autotuning

logger = logging.getLogger(__name__)


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if (
        t.dim() == 4
        and t.is_contiguous(memory_format=torch.channels_last)
        and not t.is_contiguous()
    ):
        return torch.channels_last
    return torch.contiguous_format


def padded(t: torch.Tensor, size: int) -> torch.Tensor:
    """A copy of `t` grown to `size` rows by repeating its last row, in `t`'s memory format."""
    out = torch.empty(
        (size, *t.shape[1:]), dtype=t.dtype, device=t.device, memory_format=_memory_format(t)
    )
    out[: t.shape[0]].copy_(t)
    out[t.shape[0] :].copy_(t[-1:].expand(size - t.shape[0], *t.shape[1:]))
    return out


class DistinctStreams:
    """CUDA streams, each distinct from the others this object handed out.

    torch.cuda.Stream() hands out streams round-robin from a fixed pool, so two calls can return
    the same stream; the side stream and each stage's capture stream must differ (GraphedStage).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._handles: set[int] = set()

    def new(self) -> torch.cuda.Stream:
        while True:
            stream = torch.cuda.Stream(self.device)
            if stream.cuda_stream not in self._handles:
                self._handles.add(stream.cuda_stream)
                return stream


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor


class GraphedStage:
    """`fn` replayed from CUDA graphs, one per captured batch size.

    `fn` maps batch-first tensors to one batch-first tensor, free of host syncs. A call copies
    its inputs into the graph's static inputs, replays it and returns a copy of the static
    output (the next replay overwrites it). Batches between captured sizes use the next larger
    graph (rows of a batch are independent, so the extra rows only cost time); larger batches
    are split.

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
        fn: Callable[..., torch.Tensor],
        sizes: tuple[int, ...],
        lock: threading.Lock,
        stream: torch.cuda.Stream,
        autotune: bool = False,
    ) -> None:
        self.name = name
        self.fn = fn
        self.sizes = sizes
        self.stream = stream  # warm-up and capture stream, this stage's alone
        self.autotune = autotune  # cuDNN times its algorithms while this stage captures
        self._pool = torch.cuda.graph_pool_handle()
        self._lock = lock
        self._captured: dict[tuple, _Captured] = {}
        self.failed: str | None = None  # why capture failed; the stage then runs eagerly

    def captured_sizes(self) -> list[int]:
        return sorted({key[0] for key in self._captured})

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.failed is not None:
            return self.fn(*inputs)
        b = inputs[0].shape[0]
        size = next((s for s in self.sizes if s >= b), None)
        if size is None:  # larger than every capture: run in pieces of the largest
            step = self.sizes[-1]
            parts = [self(*(t[i : i + step] for t in inputs)) for i in range(0, b, step)]
            return torch.cat(parts)
        key = (size, *((tuple(t.shape[1:]), t.dtype, _memory_format(t)) for t in inputs))
        with self._lock:
            entry = self._captured.get(key)
            if entry is None:
                try:
                    with cudnn_autotuning(self.autotune):
                        entry = self._capture(tuple(padded(t, size) for t in inputs))
                except RuntimeError as exc:
                    # Graphs are an optimisation: the eager stage computes the same numbers.
                    self.failed = f"{type(exc).__name__}: {exc}"
                    logger.warning("CUDA graph of %s failed, running it eagerly: %s",
                                   self.name, self.failed)  # fmt: skip
                    return self.fn(*inputs)
                self._captured[key] = entry
            for static, t in zip(entry.inputs, inputs, strict=True):
                static[:b].copy_(t)
            entry.graph.replay()
            return entry.output[:b].clone()

    def _capture(self, static: tuple[torch.Tensor, ...]) -> _Captured:
        current = torch.cuda.current_stream(static[0].device)
        # Warm up outside the capture: cuDNN's autotuning, lazy initialisation and compilation
        # must not happen while the stream is recording.
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            for _ in range(2):
                self.fn(*static)
        current.wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        start = time.perf_counter()
        with torch.cuda.graph(graph, pool=self._pool, stream=self.stream):
            output = self.fn(*static)
        logger.info(
            "captured %s for batch %d in %.2f s",
            self.name,
            static[0].shape[0],
            time.perf_counter() - start,
        )
        return _Captured(graph, static, output)


class CudaGraphs:
    """The graphed stages of one restorer: one lock, distinct streams, failures to report."""

    def __init__(
        self, sizes: tuple[int, ...], streams: DistinctStreams, *, autotune: bool = False
    ) -> None:
        self.sizes = sizes
        self.streams = streams
        self.autotune = autotune
        self.stages: dict[str, GraphedStage] = {}
        self._lock = threading.Lock()

    def stage(self, name: str, fn: Callable[..., torch.Tensor]) -> GraphedStage:
        graphed = GraphedStage(
            name, fn, self.sizes, self._lock, self.streams.new(), autotune=self.autotune
        )
        self.stages[name] = graphed
        return graphed

    def failures(self) -> dict[str, str]:
        return {name: s.failed for name, s in self.stages.items() if s.failed is not None}


def install_cuda_graphs(
    graphs: CudaGraphs, vre: nn.Module, vae: nn.Module, unet: nn.Module, timestep: torch.Tensor
) -> None:
    """Replace each network's call by a graphed one; the calls' signatures and results stay.

    The UNet's graph holds `timestep` as a constant: a call with another timestep tensor, or
    with other arguments, runs eagerly.
    """
    # nn.Module types attributes it does not declare as Tensor | Module: these are methods.
    encode = cast(Callable[..., Any], vae.encode)
    decode = cast(Callable[..., Any], vae.decode)
    graphed_encode = _GraphedEncode(graphs.stage("vae_encode", _moments(encode)))
    graphed_decode = _GraphedDecode(graphs.stage("vae_decode", _decoded(decode)))
    vre.forward = graphs.stage("vre", vre.forward)
    # Instance attributes shadowing the methods. torch types __setattr__'s value as
    # Tensor | Module, yet stores any other object as a plain attribute.
    vae.encode = graphed_encode  # type: ignore[assignment]
    vae.decode = graphed_decode  # type: ignore[assignment]
    unet.forward = _GraphedUNet(graphs, unet.forward, timestep)


def _moments(encode: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda x: encode(x).latent_dist.parameters  # (B, 2 * latent channels, h, w)


def _decoded(decode: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda z: decode(z).sample


class _GraphedEncode:
    """`vae.encode`: the graph computes the posterior's moments, the distribution is eager."""

    def __init__(self, moments: GraphedStage) -> None:
        self.moments = moments

    def __call__(
        self, x: torch.Tensor, return_dict: bool = True
    ) -> AutoencoderKLOutput | tuple[DiagonalGaussianDistribution]:
        posterior = DiagonalGaussianDistribution(self.moments(x))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)


class _GraphedDecode:
    """`vae.decode` replayed from its graph."""

    def __init__(self, decoded: GraphedStage) -> None:
        self.decoded = decoded

    def __call__(
        self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple[torch.Tensor]:
        sample = self.decoded(z)
        return DecoderOutput(sample=sample) if return_dict else (sample,)


class _GraphedUNet:
    """`unet.forward` at the restorer's fixed timestep, replayed from its graph."""

    def __init__(self, graphs: CudaGraphs, forward: Callable, timestep: torch.Tensor) -> None:
        self.eager = forward
        self.timestep = timestep
        self.eps = graphs.stage("unet", self._eps)

    def _eps(self, sample: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        out = self.eager(sample, self.timestep, encoder_hidden_states=context, return_dict=False)
        return out[0]

    def __call__(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        return_dict: bool = True,
        **kw: Any,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        if kw or timestep is not self.timestep:
            return self.eager(
                sample, timestep, encoder_hidden_states, return_dict=return_dict, **kw
            )
        eps = self.eps(sample, encoder_hidden_states)
        return UNet2DConditionOutput(sample=eps) if return_dict else (eps,)


def compile_networks(vre: nn.Module, vae: nn.Module, unet: nn.Module, mode: CompileMode) -> None:
    """torch.compile the VRE encoder, the VAE encoder and decoder, and the UNet, in place.

    In place, so the attributes keep their types. The UNet's `forward` is compiled rather than
    the module, so that a CUDA graph installed afterwards replays the compiled code.
    `dynamic=False`: each batch size gets code specialised to it (and, in the inductor graph
    modes, its own CUDA graph), compiled at warm-up for each size in `batch_sizes`; without it
    the second size would recompile everything with a symbolic batch dimension, while serving.
    Calls pad up to a compiled size (`FastPath.run_size`, or our graphs' padding).
    """
    parts = vre.get_submodule("encoder"), vae.get_submodule("encoder"), vae.get_submodule("decoder")
    for part in parts:
        part.compile(mode=mode, fullgraph=False, dynamic=False)
    unet.forward = torch.compile(unet.forward, mode=mode, fullgraph=False, dynamic=False)
