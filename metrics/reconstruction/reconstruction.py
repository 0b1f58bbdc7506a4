"""PSNR and SSIM between reconstructed and original images, in plain torch."""

import datasets
import evaluate
import numpy as np
import torch
import torch.nn.functional as F


_DESCRIPTION = """
Pixel fidelity of reconstructions on 8-bit RGB images scaled to [0, 1]:
- psnr: 10 log10(1 / MSE) per image in dB (MSE floored at 1e-10, so identical images give 100 dB), averaged;
- ssim: structural similarity (Wang et al., 2004) with an 11-tap Gaussian window of sigma 1.5 (shorter on images under
  11 px), K1 = 0.01, K2 = 0.03, per channel over valid positions, averaged over channels and images. 1 is identical.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `PIL.Image`): the reconstructions.
    references (`list` of `PIL.Image`): the originals, each the size of its reconstruction.
Returns:
    psnr (dB) and ssim.
Examples:
    >>> reconstruction = evaluate.load("./metrics/reconstruction")
    >>> reconstruction.compute(predictions=reconstructed_images, references=original_images)
"""

_CITATION = """
@article{wang2004image,
  title={Image Quality Assessment: From Error Visibility to Structural Similarity},
  author={Wang, Zhou and Bovik, Alan C. and Sheikh, Hamid R. and Simoncelli, Eero P.},
  journal={IEEE Transactions on Image Processing}, volume={13}, number={4}, pages={600--612}, year={2004}
}
"""


def to_unit_tensor(image):
    """PIL image -> `(1, 3, H, W)` float64 tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0).permute(2, 0, 1)[None]


def gaussian_window(size, sigma=1.5):
    """`(size, size)` normalised Gaussian window."""
    coordinates = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    profile = torch.exp(-(coordinates**2) / (2 * sigma**2))
    profile = profile / profile.sum()
    return profile[:, None] * profile[None, :]


def ssim(x, y, window_size=11, k1=0.01, k2=0.03):
    """SSIM of two `(1, C, H, W)` tensors in [0, 1], averaged over channels and valid positions."""
    size = min(window_size, x.shape[-1], x.shape[-2])
    size -= 1 - size % 2
    channels = x.shape[1]
    window = gaussian_window(size).expand(channels, 1, size, size)

    def blur(image):
        return F.conv2d(image, window, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x, var_y = blur(x * x) - mu_x**2, blur(y * y) - mu_y**2
    covariance = blur(x * y) - mu_x * mu_y
    c1, c2 = k1**2, k2**2
    index = ((2 * mu_x * mu_y + c1) * (2 * covariance + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return index.mean().item()


def psnr(x, y):
    """PSNR in dB of two tensors in [0, 1]; MSE floored at 1e-10."""
    return 10.0 * torch.log10(1.0 / (x - y).square().mean().clamp(min=1e-10)).item()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Reconstruction(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
        )

    def _compute(self, predictions, references):
        pairs = [(to_unit_tensor(p), to_unit_tensor(r)) for p, r in zip(predictions, references)]
        if any(p.shape != r.shape for p, r in pairs):
            raise ValueError("Each reconstruction must have the size of its original image.")
        return {
            "psnr": float(np.mean([psnr(p, r) for p, r in pairs])),
            "ssim": float(np.mean([ssim(p, r) for p, r in pairs])),
        }
