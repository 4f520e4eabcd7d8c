"""Computes tests/data/torch_reference.json: MS-SSIM, SSIM and pointwise losses of the
reference implementations (pytorch_msssim, torch.nn.functional) on the inputs of
tests/loss_inputs.py. Run once, where torch is installed:

    .venv/bin/pip install torch==2.13.0 pytorch-msssim   # the CPU wheel this machine has
    .venv/bin/python tests/data/make_torch_reference.py
"""

from __future__ import annotations

import json
import sys
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pytorch_msssim as pm  # noqa: E402
import torch  # noqa: E402

from loss_inputs import (MS_SSIM_SHAPES, REFERENCE_FILE, huber_inputs,  # noqa: E402
                         ms_ssim_inputs, ssim_valid_inputs)


def main() -> None:
    out = {"versions": {name: version(name) for name in ("torch", "pytorch-msssim", "numpy")},
           "ms_ssim": {}}
    for shape in MS_SSIM_SHAPES:
        a, b = ms_ssim_inputs(shape)
        ref = pm.ms_ssim(torch.from_numpy(a)[:, None], torch.from_numpy(b)[:, None],
                         data_range=1.0, size_average=False)
        out["ms_ssim"][f"{shape[0]}x{shape[1]}"] = ref.numpy().tolist()
    a, b = ssim_valid_inputs()
    out["ssim_valid"] = pm.ssim(torch.from_numpy(a)[:, None], torch.from_numpy(b)[:, None],
                                data_range=1.0, size_average=False).numpy().tolist()
    a, b = huber_inputs()
    F = torch.nn.functional
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    pointwise = {"l1": F.l1_loss(ta, tb).item(), "mse": F.mse_loss(ta, tb).item()}
    for delta in (0.1, 0.7, 2.0):
        pointwise[f"huber_{delta}"] = F.huber_loss(ta, tb, delta=delta).item()
        pointwise[f"smooth_l1_{delta}"] = F.smooth_l1_loss(ta, tb, beta=delta).item()
    out["pointwise"] = pointwise
    REFERENCE_FILE.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {REFERENCE_FILE} with {np.sum([len(v) for v in out['ms_ssim'].values()])} "
          f"MS-SSIM values")


if __name__ == "__main__":
    main()
