"""The fast path computes the plain fp32 path's function: each setting, on tiny weights.

References are independent of the fast path: the plain fp32 restorer (`fast=None`), and the
authors'-style baseline of bench/baseline.py (unmerged peft LoRA, per-image selection loop).
CUDA-only settings (graphs, streams, pinned memory) are checked when a GPU is present.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from bench.baseline import AuthorsStyleBaseline, select_codes_loop, tokens_from_codes
from model.errors import InvalidInputError
from model.networks.fastpath import FastPathConfig, batch_sizes_up_to
from model.networks.fastpath.graphs import CudaGraphs, install_cuda_graphs, padded
from model.networks.fastpath.placement import resolve_decode_dtype
from model.networks.restorer import STAGES, OSDFaceRestorer
from model.networks.vre import nearest_codes, select_token_indices

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def faces(n: int, seed: int = 0) -> torch.Tensor:
    """(n, 3, 512, 512) in [0, 1]: smooth random images, so the VAE sees structure."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 16, 16, generator=g)
    return F.interpolate(coarse, size=(512, 512), mode="bilinear", align_corners=False)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = F.mse_loss(a.double(), b.double()).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1 / mse)).item()


def assert_same_image(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal as images: under a quarter of one 8-bit level anywhere, 80 dB overall.

    fp32 kernels that only sum in another order (oneDNN's NHWC convolutions, other thread
    counts) differ by ~1e-6 per layer; the random tiny networks amplify that to ~3e-4 at most.
    A wrong layout, dtype or token would be off by far more.
    """
    assert got.shape == want.shape and got.dtype == want.dtype
    assert (got - want).abs().max().item() < 1e-3
    assert psnr(got, want) > 80


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return faces(2)


@pytest.fixture(scope="module")
def plain_fp32(tiny_restorer: OSDFaceRestorer, images: torch.Tensor) -> torch.Tensor:
    return tiny_restorer(images).images


def restore(weights: Path, images: torch.Tensor, dtype=torch.float32, device="cpu", **fast):
    r = OSDFaceRestorer.from_pretrained(weights, device, dtype, fast=FastPathConfig(**fast))
    return r(images)


# --- each setting equals the plain fp32 path ---------------------------------------------------

FP32_SETTINGS = {
    "all_defaults": {},
    "channels_last_only": dict(sdpa=False, vre_float32=False, num_threads=None),
    "no_channels_last": dict(channels_last=False),
    "no_sdpa": dict(sdpa=False),
    "no_subpixel_upsample": dict(subpixel_upsample=False),
    "one_thread": dict(num_threads=1),
    "odd_batch_sizes": dict(batch_sizes=(3, 1)),
}


@pytest.mark.parametrize("setting", FP32_SETTINGS)
def test_fp32_setting_equals_plain_path(setting, tiny_weights_dir, images, plain_fp32) -> None:
    threads = torch.get_num_threads()
    try:
        out = restore(tiny_weights_dir, images, **FP32_SETTINGS[setting])
    finally:
        torch.set_num_threads(threads)
    assert_same_image(out.images, plain_fp32)


def test_bf16_decode_is_close_to_fp32(tiny_weights_dir, images, plain_fp32) -> None:
    out = restore(tiny_weights_dir, images, decode_dtype="bfloat16")
    assert psnr(out.images, plain_fp32) > 35


def test_bf16_compute_keeps_fp32_tokens(tiny_weights_dir, images) -> None:
    """vre_float32: the tokens of a bf16 restorer are the fp32 path's, bit for bit."""
    fp32 = OSDFaceRestorer.from_pretrained(tiny_weights_dir, "cpu", torch.float32)
    bf16 = OSDFaceRestorer.from_pretrained(
        tiny_weights_dir, "cpu", torch.bfloat16, fast=FastPathConfig()
    )
    assert bf16.fast.vre_dtype == torch.float32
    assert next(bf16.unet.parameters()).dtype == torch.bfloat16
    lq = images * 2 - 1
    with torch.inference_mode():
        torch.testing.assert_close(bf16.vre.tokens(lq), fp32.vre.tokens(lq), atol=0, rtol=0)
        out = bf16(images)
    assert out.images.dtype == torch.float32
    assert psnr(out.images, fp32(images).images) > 25


@pytest.mark.slow  # inductor compiles the tiny modules: about 75 s on 2 cores with a cold cache
def test_compiled_equals_plain_path(tiny_weights_dir, images, plain_fp32) -> None:
    out = restore(tiny_weights_dir, images, compile=True)
    assert_same_image(out.images, plain_fp32)


# --- merged == unmerged, batched == per-image loop --------------------------------------------


def test_fast_path_equals_authors_style_baseline(tiny_weights_dir, images) -> None:
    """Merged LoRA + batched VRE + fast path == unmerged peft LoRA + per-image loop.

    With `.sample()` latents too, for one image: the same seed draws the same posterior noise
    (for a batch the draws differ: one generator per image in the baseline, one per batch here).
    """
    baseline = AuthorsStyleBaseline.from_weights(tiny_weights_dir)
    fast = OSDFaceRestorer.from_pretrained(tiny_weights_dir, fast=FastPathConfig())
    assert_same_image(fast(images).images, baseline(images, latent="mode").images)
    one = images[:1]
    got = fast(one, latent="sample", seed=7).images
    assert_same_image(got, baseline(one, latent="sample", seed=7).images)
    assert psnr(got, fast(one, latent="mode").images) < 80  # the noise is really there


def test_unmerged_lora_under_the_fast_path(tiny_weights_dir, images) -> None:
    merged = restore(tiny_weights_dir, images)
    r = OSDFaceRestorer.from_pretrained(tiny_weights_dir, merge_lora=False, fast=FastPathConfig())
    assert any("lora" in name for name, _ in r.unet.named_modules())  # adapters, not merged
    assert_same_image(r(images).images, merged.images)


@pytest.mark.parametrize(("k", "tokens"), [(1024, 77), (40, 77), (8, 5)])
def test_batched_selection_equals_per_image_loop(k: int, tokens: int) -> None:
    """Includes fewer distinct codes than tokens (zero rows) and exact ties (repeated rows)."""
    g = torch.Generator().manual_seed(k)
    codebook = torch.randn(k, 16, generator=g)
    features = torch.randn(5, 256, 16, generator=g)
    features[:, 100:140] = features[:, 0:40]  # ties: equal distances at other positions
    distance, index = nearest_codes(features, codebook)
    codes, valid = select_token_indices(distance, index, k, tokens)
    for b in range(5):
        want = select_codes_loop(features[b], codebook, tokens)
        got = codes[b][valid[b]].tolist()
        assert got == want
        rows = codebook[codes[b]] * valid[b, :, None]
        torch.testing.assert_close(rows, tokens_from_codes(want, codebook, tokens), atol=0, rtol=0)


# --- contract and helpers ---------------------------------------------------------------------


def test_fast_output_contract(tiny_weights_dir) -> None:
    r = OSDFaceRestorer.from_pretrained(tiny_weights_dir, fast=FastPathConfig())
    out = r(faces(3, seed=1))
    assert out.images.shape == (3, 3, 512, 512) and out.images.dtype == torch.float32
    assert out.images.is_contiguous() and out.images.device.type == "cpu"
    assert out.images.min() >= 0 and out.images.max() <= 1
    assert set(out.timings) == set(STAGES) and all(t >= 0 for t in out.timings.values())
    assert r.describe()["fast_path"]["enabled"] is True


def test_config_validation_and_helpers() -> None:
    assert FastPathConfig(batch_sizes=(8, 1, 8)).batch_sizes == (1, 8)
    for bad in (dict(batch_sizes=()), dict(batch_sizes=(0,)), dict(num_threads=0)):
        with pytest.raises(InvalidInputError):
            FastPathConfig(**bad)
    with pytest.raises(InvalidInputError):
        FastPathConfig(decode_dtype="float64")
    assert batch_sizes_up_to(8) == (1, 2, 4, 8)
    assert batch_sizes_up_to(6) == (1, 2, 4, 6)
    assert batch_sizes_up_to(1) == (1,)
    fp16 = FastPathConfig()
    assert resolve_decode_dtype(fp16, torch.float16) == torch.bfloat16  # fp16 range overflows
    assert resolve_decode_dtype(fp16, torch.float32) == torch.float32
    assert (
        resolve_decode_dtype(dataclasses.replace(fp16, decode_dtype="float32"), torch.float16)
        == torch.float32
    )


def test_padding_keeps_rows_and_layout() -> None:
    x = torch.randn(3, 4, 5, 6).contiguous(memory_format=torch.channels_last)
    p = padded(x, 8)
    assert p.shape == (8, 4, 5, 6) and p.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(p[:3], x, atol=0, rtol=0)
    torch.testing.assert_close(p[3:], x[-1:].expand(5, 4, 5, 6), atol=0, rtol=0)


def test_warmup_sizes(tiny_weights_dir) -> None:
    def fast_path(**settings):
        r = OSDFaceRestorer.from_pretrained(tiny_weights_dir, fast=FastPathConfig(**settings))
        return r.fast

    cpu = fast_path(batch_sizes=(1, 4))
    assert cpu.graphs is None and cpu.side is None  # CUDA-only settings are off on the CPU
    assert cpu.warmup_sizes(2) == (2,)  # nothing is captured per shape on the CPU
    compiled = fast_path(batch_sizes=(1, 4), compile=True)  # compiles lazily, at the first call
    assert compiled.warmup_sizes(2) == (1, 2, 4)


class EagerStages(CudaGraphs):
    """Stages that call their function instead of replaying a graph: the CUDA-graph wrappers
    of the networks, checked on the CPU (capture and replay need a GPU, see below)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {}

    def stage(self, name, fn):
        def run(*inputs):
            self.calls[name] = self.calls.get(name, 0) + 1
            return fn(*inputs)

        return run


def test_graph_wrappers_keep_the_networks_calls(tiny_weights_dir, images, plain_fp32) -> None:
    """With the wrappers installed, every network call goes through its stage once per batch,
    and the restorer computes what it did before, for both latents."""
    r = OSDFaceRestorer.from_pretrained(tiny_weights_dir, fast=FastPathConfig())
    sampled = r(images[:1], latent="sample", seed=3).images
    stages = EagerStages()
    install_cuda_graphs(stages, r.vre, r.vae, r.unet, r._timestep)
    assert_same_image(r(images).images, plain_fp32)
    assert stages.calls == dict.fromkeys(STAGES, 1)
    torch.testing.assert_close(r(images[:1], latent="sample", seed=3).images, sampled)
    prompt = torch.zeros(1, r.config.vre.num_tokens, r.config.vre.prompt_dim)
    with torch.inference_mode():
        z = r.vae.encode(images[:1] * 2 - 1).latent_dist.mode()
        r.unet(z, torch.tensor([r.config.timestep]), encoder_hidden_states=prompt)
    assert stages.calls["unet"] == 2, "another timestep tensor runs eagerly, not from the graph"


# --- CUDA ------------------------------------------------------------------------------------


@pytest.fixture
def strict_fp32():
    """No TF32 and no autotuning: other batch sizes may pick other cuDNN algorithms, and TF32
    rounding would then differ by more than the summation order of fp32."""
    flags = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = flags[0].allow_tf32, flags[1].allow_tf32, flags[0].benchmark
    flags[0].allow_tf32 = flags[1].allow_tf32 = flags[0].benchmark = False
    yield
    flags[0].allow_tf32, flags[1].allow_tf32, flags[0].benchmark = saved


@needs_cuda
@pytest.mark.parametrize("batch", [1, 2, 3, 5])
def test_cuda_graphs_streams_pinned_equal_eager(tiny_weights_dir, batch: int, strict_fp32) -> None:
    """Graph replay (padded 3 -> 4, split 5 -> 4 + 1), side stream and pinned copies change
    nothing: the same fp32 numbers as the eager fast path on the same GPU."""
    x = faces(batch, seed=batch)
    eager = restore(tiny_weights_dir, x, device="cuda", cuda_graphs=False, overlap=False,
                    pin_memory=False, cudnn_benchmark=False)  # fmt: skip
    r = OSDFaceRestorer.from_pretrained(
        tiny_weights_dir,
        "cuda",
        fast=FastPathConfig(batch_sizes=(1, 2, 4), cudnn_benchmark=False, overlap=True),
    )
    assert r.fast.graphs is not None and r.fast.side is not None
    for _ in range(3):  # capture, then replays
        out = r(x)
        assert_same_image(out.images, eager.images)
    assert set(out.timings) == set(STAGES)
    assert set(r.fast.graphs.stages) == set(STAGES) and r.fast.graphs.failures() == {}
    assert all(stage.captured_sizes() for stage in r.fast.graphs.stages.values())


@needs_cuda
def test_cuda_fast_path_equals_plain_path_in_fp32(tiny_weights_dir, images, strict_fp32) -> None:
    """Every default setting on CUDA (subpixel upsampling in cuDNN, graphs, NHWC) against the
    plain path on the same GPU, both in true fp32."""
    plain = OSDFaceRestorer.from_pretrained(tiny_weights_dir, "cuda")(images)
    fast = restore(tiny_weights_dir, images, device="cuda", cudnn_benchmark=False)
    assert_same_image(fast.images, plain.images)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_half_precision_parity(tiny_weights_dir, images, plain_fp32, dtype) -> None:
    out = restore(tiny_weights_dir, images, dtype=dtype, device="cuda")
    assert torch.isfinite(out.images).all()
    assert psnr(out.images, plain_fp32) > 25


@needs_cuda
@pytest.mark.parametrize(
    ("overlap", "graphs"), [(False, True), (True, True), (True, False)], ids=str
)
def test_cuda_fast_path_is_repeatable_from_a_worker_thread(
    tiny_weights_dir, overlap: bool, graphs: bool
) -> None:
    """Twenty identical calls give identical images, as the service makes them: warm-up (and
    graph capture) on the loading thread, calls from one worker thread. Deterministic cuDNN
    algorithms, so any difference is a race between streams or graphs (on an H200 the side
    stream once gave a NaN and differences over the whole range, before each stage's graphs
    had their own capture stream)."""
    from concurrent.futures import ThreadPoolExecutor

    saved = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    try:
        fast = FastPathConfig(
            batch_sizes=(1, 2), cudnn_benchmark=False, overlap=overlap, cuda_graphs=graphs
        )
        r = OSDFaceRestorer.from_pretrained(tiny_weights_dir, "cuda", torch.float16, fast=fast)
        r.warmup(1)
        x = faces(2, seed=7)
        with ThreadPoolExecutor(max_workers=1) as worker:
            outs = [worker.submit(r, x).result().images for _ in range(20)]
    finally:
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved
    assert (r.fast.side is not None) == overlap and (r.fast.graphs is not None) == graphs
    assert not r.fast.graphs or r.fast.graphs.failures() == {}
    assert all(torch.isfinite(o).all() for o in outs)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
