"""The restorer's process-wide CUDA settings, checked on the CPU where they can be: cuDNN
autotuning only during the warm-up, the VRE without TF32, torch.compile with fixed batch sizes,
and the worker's own stream. Where the device itself decides (the stream, the VRE's tokens
against the CPU's), a CUDA test checks it when a GPU is present.

Only model code is imported, so the GPU image (without the service's packages) runs this file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model.networks import vre as vre_module
from model.networks.fastpath import FastPathConfig
from model.networks.restorer import OSDFaceRestorer

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def faces(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, 512, 512) in [0, 1]: smooth random images, so the VAE sees structure."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 16, 16, generator=g)
    return F.interpolate(coarse, size=(512, 512), mode="bilinear", align_corners=False)


def tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


@pytest.fixture
def tf32_on():
    """Both TF32 flags on (matmul's is off by default), put back afterwards."""
    saved = tf32_flags()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.fixture
def benchmark_flag():
    saved = torch.backends.cudnn.benchmark
    yield
    torch.backends.cudnn.benchmark = saved


@pytest.fixture(scope="module")
def fast_restorer(tiny_weights_dir: Path) -> OSDFaceRestorer:
    return OSDFaceRestorer.from_pretrained(tiny_weights_dir, fast=FastPathConfig(batch_sizes=(1,)))


def spy_on_unet(r: OSDFaceRestorer, monkeypatch, record) -> None:
    """Call `record(sample)` inside each UNet call of `r` (this test's only)."""
    forward = r.unet.forward

    def spied(sample, *args, **kwargs):
        record(sample)
        return forward(sample, *args, **kwargs)

    monkeypatch.setattr(r.unet, "forward", spied)


# --- cuDNN autotuning: the warm-up only ------------------------------------------------------


@pytest.mark.parametrize("before", [False, True])
def test_cudnn_autotunes_during_the_warm_up_only(
    fast_restorer, monkeypatch, benchmark_flag, before: bool
) -> None:
    torch.backends.cudnn.benchmark = before
    seen: list[bool] = []
    spy_on_unet(fast_restorer, monkeypatch, lambda _: seen.append(torch.backends.cudnn.benchmark))
    fast_restorer.warmup(1)
    assert seen and all(seen), "the warm-up autotunes"
    assert torch.backends.cudnn.benchmark is before, "the flag is back to its earlier value"
    seen.clear()
    fast_restorer(faces(1))
    assert seen == [before], "a call outside the warm-up leaves the flag alone"


def test_loading_leaves_the_cudnn_flag_alone(tiny_weights_dir, benchmark_flag) -> None:
    torch.backends.cudnn.benchmark = False
    r = OSDFaceRestorer.from_pretrained(tiny_weights_dir, fast=FastPathConfig(cuda_graphs=False))
    assert torch.backends.cudnn.benchmark is False
    assert r.fast is not None


def test_no_autotuning_when_switched_off(tiny_weights_dir, monkeypatch, benchmark_flag) -> None:
    torch.backends.cudnn.benchmark = False
    fast = FastPathConfig(batch_sizes=(1,), cudnn_benchmark=False)
    r = OSDFaceRestorer.from_pretrained(tiny_weights_dir, fast=fast)
    seen: list[bool] = []
    spy_on_unet(r, monkeypatch, lambda _: seen.append(torch.backends.cudnn.benchmark))
    r.warmup(1)
    assert seen == [False]


# --- the VRE without TF32 --------------------------------------------------------------------


def test_the_vre_stage_runs_without_tf32_and_restores_the_flags(
    fast_restorer, monkeypatch, tf32_on
) -> None:
    """Inside the VRE's encoder (convolutions) and its distance matmul both TF32 flags are
    off; before and after the call they are as the process set them."""
    inside: dict[str, tuple[bool, bool]] = {}
    encoder_forward = fast_restorer.vre.encoder.forward
    nearest = vre_module.nearest_codes

    def encoder(x):
        inside["encoder"] = tf32_flags()
        return encoder_forward(x)

    def codes(features, codebook):
        inside["distance"] = tf32_flags()
        return nearest(features, codebook)

    monkeypatch.setattr(fast_restorer.vre.encoder, "forward", encoder)
    monkeypatch.setattr(vre_module, "nearest_codes", codes)
    unet_flags: list[tuple[bool, bool]] = []
    spy_on_unet(fast_restorer, monkeypatch, lambda _: unet_flags.append(tf32_flags()))
    fast_restorer(faces(1))
    assert inside == {"encoder": (False, False), "distance": (False, False)}
    assert unet_flags == [(True, True)], "the other stages keep the process's flags"
    assert tf32_flags() == (True, True)


def test_tf32_flags_come_back_after_an_error(tf32_on) -> None:
    with pytest.raises(RuntimeError, match="inside"), vre_module.without_tf32():
        assert tf32_flags() == (False, False)
        raise RuntimeError("inside")
    assert tf32_flags() == (True, True)


# --- torch.compile: fixed batch sizes --------------------------------------------------------


def test_compile_is_static_and_batches_pad_to_a_compiled_size(tiny_weights_dir, monkeypatch):
    """Every compiled part gets `dynamic=False`; a batch of 3 runs at the compiled size 4, its
    three faces the same as an uncompiled call's. torch.compile is replaced by a recorder that
    returns the function uncompiled (compiling takes minutes on a CPU)."""
    options: list[dict] = []
    batches: list[int] = []

    def recording_compile(fn, **kwargs):
        options.append(kwargs)

        def call(*args, **kw):
            if args and isinstance(args[0], torch.Tensor):
                batches.append(args[0].shape[0])
            return fn(*args, **kw)

        return call

    monkeypatch.setattr(torch, "compile", recording_compile)
    fast = FastPathConfig(compile=True, batch_sizes=(1, 2, 4))
    compiled = OSDFaceRestorer.from_pretrained(tiny_weights_dir, fast=fast)
    assert len(options) == 4 and all(o["dynamic"] is False for o in options), options
    assert compiled.fast is not None and compiled.fast.warmup_sizes(1) == (1, 2, 4)
    x = faces(3, seed=3)
    out = compiled(x)
    assert out.images.shape == (3, 3, 512, 512)
    assert batches and set(batches) == {4}, batches
    eager = OSDFaceRestorer.from_pretrained(tiny_weights_dir, fast=FastPathConfig())(x)
    torch.testing.assert_close(out.images, eager.images, atol=1e-3, rtol=0)


def test_no_worker_stream_on_the_cpu(fast_restorer) -> None:
    assert fast_restorer.worker_stream() is None
    assert fast_restorer.describe()["fast_path"]["worker_stream"] is False


# --- on a GPU --------------------------------------------------------------------------------


@needs_cuda
def test_cuda_worker_stream_is_its_own_and_computes_the_same(tiny_weights_dir, benchmark_flag):
    torch.backends.cudnn.benchmark = False
    r = OSDFaceRestorer.from_pretrained(tiny_weights_dir, "cuda", fast=FastPathConfig())
    r.warmup(1)
    assert torch.backends.cudnn.benchmark is False
    stream = r.worker_stream()
    assert stream is not None and stream != torch.cuda.default_stream()
    assert r.fast is not None and r.fast.graphs is not None
    capture = {s.stream.cuda_stream for s in r.fast.graphs.stages.values()}
    assert stream.cuda_stream not in capture
    x = faces(2, seed=1)
    on_default = r(x).images
    with torch.cuda.stream(stream):
        on_own = r(x).images
    stream.synchronize()
    assert (on_own - on_default).abs().max().item() < 1e-3
    off = FastPathConfig(worker_stream=False)
    assert (
        OSDFaceRestorer.from_pretrained(tiny_weights_dir, "cuda", fast=off).worker_stream() is None
    )


@needs_cuda
def test_cuda_vre_picks_the_cpus_tokens_with_tf32_on(tiny_weights_dir, tf32_on) -> None:
    """TF32 on for the process (cuDNN's default, matmul's too here): the VRE's tokens on CUDA
    are the CPU's, code for code."""
    cpu = OSDFaceRestorer.from_pretrained(tiny_weights_dir, "cpu")
    gpu = OSDFaceRestorer.from_pretrained(tiny_weights_dir, "cuda")
    lq = faces(2, seed=5) * 2 - 1
    with torch.inference_mode():
        want = cpu.vre.tokens(lq)
        got = gpu.vre.tokens(lq.cuda()).cpu()
    rows_equal = (got == want).all(dim=-1)  # (B, 77): the same code in each place
    assert bool(rows_equal.all()), rows_equal.float().mean().item()
    assert tf32_flags() == (True, True)
