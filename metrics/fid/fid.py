"""Fréchet distance (Heusel et al., 2017) between Gaussians fitted to generated and real image features."""

import datasets
import evaluate
import numpy as np
import torch


_DESCRIPTION = """
FID: the Fréchet distance between Gaussians fitted to two sets of image features,
|mu_g - mu_r|^2 + tr(S_g + S_r - 2 (S_g^1/2 S_r S_g^1/2)^1/2). 0 for identical sets. It is biased upwards at small
sample sizes, so compare FIDs only at equal counts (KID does not have this problem).
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `(d,)` float vectors): features of the generated images.
    real_features (`array` of shape `(n, d)`): features of the real images; `n` may differ from the generated count.
Returns:
    fid: the Fréchet distance.
Examples:
    >>> fid = evaluate.load("./metrics/fid")
    >>> fid.compute(predictions=generated_features, real_features=real_features)["fid"]
"""

_CITATION = """
@inproceedings{heusel2017gans,
  title={{GAN}s Trained by a Two Time-Scale Update Rule Converge to a Local {N}ash Equilibrium},
  author={Heusel, Martin and Ramsauer, Hubert and Unterthiner, Thomas and Nessler, Bernhard and Hochreiter, Sepp},
  booktitle={NeurIPS}, year={2017}
}
"""


def trace_sqrt_product(x, y):
    """
    tr((S_x S_y)^1/2) for the sample covariances of `(n, d)` and `(m, d)` rows: the nuclear norm of the centred
    cross-product X Y^T / sqrt((n - 1)(m - 1)), whose squared singular values are the eigenvalues of S_x S_y.
    Exact, and an `(n, m)` problem rather than a `(d, d)` matrix square root.
    """
    x, y = x - x.mean(0), y - y.mean(0)
    return torch.linalg.svdvals(x @ y.T).sum() / ((x.shape[0] - 1) * (y.shape[0] - 1)) ** 0.5


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class FID(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Sequence(datasets.Value("float32"))}),
        )

    def _compute(self, predictions, real_features):
        generated = torch.as_tensor(np.asarray(predictions), dtype=torch.float64)
        real = torch.as_tensor(np.asarray(real_features), dtype=torch.float64)
        if generated.shape[0] < 2 or real.shape[0] < 2:
            raise ValueError("FID needs at least 2 generated and 2 real feature vectors.")
        mean_term = (generated.mean(0) - real.mean(0)).square().sum()
        traces = generated.var(0).sum() + real.var(0).sum()
        fid = mean_term + traces - 2.0 * trace_sqrt_product(generated, real)
        return {"fid": max(fid.item(), 0.0)}
