"""The restorer's fast path: each speed-up is one setting of `FastPathConfig`.

`OSDFaceRestorer.from_pretrained(..., fast=FastPathConfig())` turns it on; `fast=None` keeps the
plain path (modules in one dtype, NCHW, a stream sync per stage). Every setting computes the same
function as the plain fp32 path: tests/test_fastpath.py checks each on tiny weights (CPU), and
bench/speed.py reports the PSNR of the fast path against fp32 at full size.

The rooms: `config` (the settings), `placement` (dtypes, memory format, attention processors,
subpixel upsampling, host <-> device copies), `graphs` (CUDA graphs and torch.compile, each
wrapping a network's call once at load), `clock` (stage timing, the side stream), `flags`
(process-wide backend flags set for a span of work), `upsample` (the subpixel layer).
`load.FastPath.load` applies them all. Importing this package imports only the settings (no
torch).

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
  four 2x2 convolutions at the input's resolution (model/networks/fastpath/upsample.py): 2.25x fewer
  multiply-adds in those layers, 208 fewer GMACs per face (9% of 2,318), same function.
- `vre_float32`: the VRE (about 5% of the work) stays in fp32, so the 77 tokens, a discrete choice
  that a rounding can flip, are the fp32 path's; its distances are fp32 in any case.
- `overlap` (CUDA, off by default): the VRE runs on a second stream, concurrently with the VAE
  encoder (the two only share their input). Stage times then come from CUDA events, with no sync
  between stages.
- `worker_stream` (CUDA): `restorer.worker_stream()` hands the thread that calls the restorer
  (the service's model worker) a stream of its own, distinct from the side and capture streams;
  other threads' default-stream work (the face detector's copies and `.cpu()`) then does not
  wait behind a batch in flight.
- `pin_memory` (CUDA): page-locked host buffers, so copies are asynchronous DMA.
- `cuda_graphs` (CUDA): each network call is captured once per batch size in `batch_sizes` and
  replayed, which removes the launch overhead of the UNet's ~1,500 kernels; other sizes are
  padded up to the next captured size (rows of a batch are independent) or split.
- `compile`: `torch.compile` of the VRE encoder, VAE encoder and decoder, and UNet for the fixed
  512x512 shapes, `dynamic=False`; compiled at warm-up, for each size in `batch_sizes`, and calls
  pad up to one of those sizes. With `compile_mode="reduce-overhead"` inductor captures its own
  CUDA graphs (which belong to the thread that recorded them: warm up on the calling thread) and
  `cuda_graphs` is not used.
- `cudnn_benchmark` (CUDA): cuDNN times its algorithms once per shape, during the warm-up and
  graph captures only (`flags.cudnn_autotuning`); the tuned choices stay, the process flag does
  not, so other convolutions in the process (the face detector's) are not autotuned.
- `num_threads` (CPU): intra-op threads; None leaves PyTorch's choice (one per core).

On the CPU, PyTorch's allocator returns big activations to the OS after each use and page-faults
them back in; `THP_MEM_ALLOC_ENABLE=1` in the environment (read by PyTorch once, at its first
allocation, so it must be set before the process starts) backs them with 2 MB pages. It is a
process setting, not one of this package's: see docs/performance.md.
"""

from model.networks.fastpath.config import FastPathConfig, batch_sizes_up_to

__all__ = ["FastPathConfig", "batch_sizes_up_to"]
