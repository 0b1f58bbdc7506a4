"""Kernel Inception Distance (Bińkowski et al., 2018) between generated and real image features."""

import datasets
import evaluate
import numpy as np
import torch


_DESCRIPTION = """
KID: the unbiased squared MMD between two sets of image features under the cubic polynomial kernel
k(x, y) = (x.y / d + 1)^3, averaged over random subsets of `subset_size` rows of each set. About 0 when both sets
come from the same distribution; it grows as they part. Unlike FID it is unbiased at small sample sizes.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `(d,)` float vectors): features of the generated images.
    real_features (`array` of shape `(n, d)`): features of the real images; `n` may differ from the generated count.
    subset_size (`int`, defaults to 100): rows per subset, lowered to the smaller set's size if that is smaller.
    num_subsets (`int`, defaults to 100): random subset pairs averaged.
    seed (`int`, defaults to 0): seed of the subset draws.
Returns:
    kid: the mean MMD^2 over subsets; kid_std: its standard deviation; kid_x1000: kid times 1000; subset_size: used.
Examples:
    >>> kid = evaluate.load("./metrics/kid")
    >>> kid.compute(predictions=generated_features, real_features=real_features)["kid_x1000"]
"""

_CITATION = """
@inproceedings{binkowski2018demystifying,
  title={Demystifying {MMD} {GAN}s},
  author={Bi{\\'n}kowski, Miko{\\l}aj and Sutherland, Dougal J. and Arbel, Michael and Gretton, Arthur},
  booktitle={ICLR}, year={2018}
}
"""


def polynomial_kernel(x, y):
    """Cubic polynomial kernel matrix `(len(x), len(y))` between feature rows."""
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def unbiased_mmd2(x, y):
    """Unbiased MMD^2 between two equally sized `(m, d)` float64 feature sets under the polynomial kernel."""
    m = x.shape[0]
    k_xx, k_yy, k_xy = polynomial_kernel(x, x), polynomial_kernel(y, y), polynomial_kernel(x, y)
    within = (k_xx.sum() - k_xx.diagonal().sum() + k_yy.sum() - k_yy.diagonal().sum()) / (m * (m - 1))
    return (within - 2.0 * k_xy.mean()).item()


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class KID(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float32"))}),
        )

    def _compute(self, predictions, real_features, subset_size=100, num_subsets=100, seed=0):
        generated = torch.as_tensor(np.asarray(predictions), dtype=torch.float64)
        real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64)
        subset_size = min(subset_size, generated.shape[0], real.shape[0])
        if subset_size < 2:
            raise ValueError("KID needs at least 2 generated and 2 real feature vectors.")
        generator = torch.Generator().manual_seed(seed)
        estimates = torch.tensor(
            [
                unbiased_mmd2(
                    generated[torch.randperm(generated.shape[0], generator=generator)[:subset_size]],
                    real[torch.randperm(real.shape[0], generator=generator)[:subset_size]],
                )
                for _ in range(num_subsets)
            ]
        )
        kid = estimates.mean().item()
        return {"kid": kid, "kid_std": estimates.std().item(), "kid_x1000": 1000.0 * kid, "subset_size": subset_size}
