"""`FastPath.load`: every setting of a `FastPathConfig` applied to the networks, once."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from model.networks.fastpath.config import FastPathConfig
from model.networks.fastpath.graphs import (
    CudaGraphs,
    DistinctStreams,
    compile_networks,
    install_cuda_graphs,
)
from model.networks.fastpath.placement import (
    Transfer,
    place,
    place_vae,
    resolve_decode_dtype,
    sdpa_attention,
    subpixel_upsampling,
)


@dataclass
class FastPath:
    """What the fast path set up at load, and what the restorer reads per call."""

    config: FastPathConfig
    vre_dtype: torch.dtype
    decode_dtype: torch.dtype
    transfer: Transfer
    side: torch.cuda.Stream | None  # the VRE's stream when `overlap` is on
    graphs: CudaGraphs | None
    streams: DistinctStreams | None  # on CUDA: the side, capture and worker streams' source

    @classmethod
    def load(
        cls,
        config: FastPathConfig,
        vre: nn.Module,
        vae: nn.Module,
        unet: nn.Module,
        *,
        device: torch.device,
        dtype: torch.dtype,
        timestep: torch.Tensor,
    ) -> FastPath:
        """Place the networks and wrap their calls, in place; `timestep` is the UNet's."""
        c, cuda = config, device.type == "cuda"
        vre_dtype = torch.float32 if c.vre_float32 else dtype
        decode_dtype = resolve_decode_dtype(c, dtype)
        if c.subpixel_upsample:
            for model in (vae, unet):
                subpixel_upsampling(model)
        place(vre, device, vre_dtype, channels_last=c.channels_last)
        place_vae(vae, device, dtype, decode_dtype, channels_last=c.channels_last)
        place(unet, device, dtype, channels_last=c.channels_last)
        _backend_settings(c, device)
        if c.sdpa:
            sdpa_attention(vae, unet)
        if c.compile:
            compile_networks(vre, vae, unet, c.compile_mode)
        streams = DistinctStreams(device) if cuda else None
        graphs = None
        if streams is not None and c.uses_cuda_graphs(device.type):
            graphs = CudaGraphs(c.batch_sizes, streams, autotune=c.cudnn_benchmark)
            install_cuda_graphs(graphs, vre, vae, unet, timestep)
        return cls(
            config=c,
            vre_dtype=vre_dtype,
            decode_dtype=decode_dtype,
            transfer=Transfer(device, torch.float32, c.channels_last, c.pin_memory and cuda),
            side=streams.new() if c.overlap and streams is not None else None,
            graphs=graphs,
            streams=streams,
        )

    def warmup_sizes(self, batch_size: int) -> tuple[int, ...]:
        """Sizes to run at warm-up: every captured, compiled or autotuned size, else the one
        asked for (cuDNN autotunes at warm-up only, so each size it should tune runs then)."""
        autotuned = self.config.cudnn_benchmark and self.transfer.device.type == "cuda"
        if self.graphs is not None or self.config.compile or autotuned:
            return tuple(sorted({*self.config.batch_sizes, batch_size}))
        return (batch_size,)

    def run_size(self, batch: int) -> int:
        """The batch size a call of `batch` faces runs at. Compiled code without our graphs is
        specialised to each size it saw (`dynamic=False`), so a batch pads up to the next
        compiled size rather than compiling again while serving; our graphs pad for themselves.
        """
        if not self.config.compile or self.graphs is not None:
            return batch
        return next((s for s in self.config.batch_sizes if s >= batch), batch)

    def worker_stream(self) -> torch.cuda.Stream | None:
        """A CUDA stream of its own for the thread that calls the restorer (`worker_stream`),
        distinct from the side and capture streams; None on the CPU or when switched off."""
        if self.streams is None or not self.config.worker_stream:
            return None
        return self.streams.new()

    def describe(self) -> dict:
        return {
            "enabled": True,
            "channels_last": self.transfer.channels_last,
            "subpixel_upsample": self.config.subpixel_upsample,
            "vre_dtype": str(self.vre_dtype).removeprefix("torch."),
            "decode_dtype": str(self.decode_dtype).removeprefix("torch."),
            "overlap": self.side is not None,
            "worker_stream": self.config.worker_stream and self.streams is not None,
            "pin_memory": self.transfer.pin,
            "cuda_graphs": self.graphs is not None,
            "graph_failures": self.graphs.failures() if self.graphs is not None else {},
            "compile": self.config.compile and self.config.compile_mode,
            "batch_sizes": list(self.config.batch_sizes),
        }


def _backend_settings(c: FastPathConfig, device: torch.device) -> None:
    """Process-wide settings the fast path asks for. cuDNN autotuning is not one of them: it is
    on only while the restorer warms up or captures (flags.cudnn_autotuning)."""
    if device.type == "cpu" and c.num_threads is not None:
        torch.set_num_threads(c.num_threads)
