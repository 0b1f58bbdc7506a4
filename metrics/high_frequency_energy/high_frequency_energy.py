"""Share of spectral energy at high spatial frequencies: how much fine line work a set of images carries."""

import datasets
import evaluate
import numpy as np


_DESCRIPTION = """
For each image: the power spectrum of its greyscale version, with the radial frequency normalised so that the Nyquist
radius is 1; the share of its energy at radius > `cutoff` (0.25: the upper three quarters of the radial frequencies)
over all energy except the DC term. Averaged over the images. Blurry images score far below crisp line work; divide a
generated set's value by the real set's to get a ratio that is about 1 when the detail matches.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `PIL.Image`): the images.
    cutoff (`float`, defaults to 0.25): the radius, as a fraction of Nyquist, above which energy counts as high.
Returns:
    high_frequency_share: the mean share in [0, 1]; images without any non-DC energy (flat) count as 0.
Examples:
    >>> high_frequency_energy = evaluate.load("./metrics/high_frequency_energy")
    >>> high_frequency_energy.compute(predictions=images)["high_frequency_share"]
"""


def high_frequency_share(image, cutoff=0.25):
    """Share of the non-DC power of a PIL image's greyscale spectrum at radial frequency > `cutoff` x Nyquist."""
    grey = np.asarray(image.convert("L"), dtype=np.float64)
    power = np.abs(np.fft.fft2(grey)) ** 2
    frequency_y = np.fft.fftfreq(grey.shape[0])[:, None]
    frequency_x = np.fft.fftfreq(grey.shape[1])[None, :]
    radius = np.sqrt(frequency_y**2 + frequency_x**2) / 0.5
    total = power[radius > 0].sum()
    return float(power[radius > cutoff].sum() / total) if total > 0 else 0.0


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class HighFrequencyEnergy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Image()}),
        )

    def _compute(self, predictions, cutoff=0.25):
        shares = [high_frequency_share(image, cutoff) for image in predictions]
        return {"high_frequency_share": float(np.mean(shares))}
