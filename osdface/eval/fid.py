"""FID with pyiqa's clean-fid Inception: restored folder against a folder or FFHQ statistics.

FID(FFHQ) uses clean-fid's FFHQ 512 train+val statistics (`ffhq_clean_trainval70k_512.npz`),
FID(HQ) the HQ folder itself; both are set-level numbers, not per image.
"""

from __future__ import annotations

from pathlib import Path

import torch

from osdface.eval.files import offline_pyiqa, require_files


class FID:
    def __init__(self, root: Path, device: torch.device) -> None:
        import pyiqa

        self.root = Path(root)
        self.device = device
        require_files(root, ["fid"])
        with offline_pyiqa(root):
            self.metric = pyiqa.create_metric("fid", device=device)

    def against_folder(self, restored: Path, reference: Path) -> float:
        with offline_pyiqa(self.root):
            return float(self.metric(str(restored), str(reference), **self._options()))

    def against_ffhq(self, restored: Path) -> float:
        require_files(self.root, ["fid"], ffhq_stats=True)
        with offline_pyiqa(self.root):
            return float(
                self.metric(
                    str(restored),
                    dataset_name="FFHQ",
                    dataset_res=512,
                    dataset_split="trainval70k",
                    **self._options(),
                )
            )

    def _options(self) -> dict:
        # Worker processes would each import torch; one loader thread keeps memory bounded.
        return {"mode": "clean", "num_workers": 0, "batch_size": 8, "verbose": False}
