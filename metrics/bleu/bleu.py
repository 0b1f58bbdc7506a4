"""Corpus BLEU-4 (Papineni et al., 2002) with add-one smoothing (Lin & Och, 2004), computed locally and offline."""

import math
import re
from collections import Counter

import datasets
import evaluate


_DESCRIPTION = """
Corpus-level BLEU: the geometric mean of the modified n-gram precisions for n = 1..`max_order`, times a brevity
penalty against the closest reference length. Captions are lower-cased and split into words and punctuation marks.
With `smooth=True` every precision is (matches + 1) / (candidates + 1), so short corpora with no 4-gram match do not
score exactly 0. Scores lie in [0, 1].
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the generated captions.
    references (`list` of `list` of `str`): one or more reference captions per prediction.
    max_order (`int`, defaults to 4): longest n-gram.
    smooth (`bool`, defaults to True): add-one smoothing of the precisions.
Returns:
    bleu, precisions (per order), brevity_penalty, length_ratio, translation_length, reference_length.
Examples:
    >>> bleu = evaluate.load("./metrics/bleu")
    >>> bleu.compute(predictions=["An engraving of a ship"], references=[["An engraving of a ship at sea"]])["bleu"]
"""

_CITATION = """
@inproceedings{papineni2002bleu,
  title={{BLEU}: a Method for Automatic Evaluation of Machine Translation},
  author={Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing}, booktitle={ACL}, year={2002}
}
@inproceedings{lin2004orange,
  title={{ORANGE}: a Method for Evaluating Automatic Evaluation Metrics for Machine Translation},
  author={Lin, Chin-Yew and Och, Franz Josef}, booktitle={COLING}, year={2004}
}
"""


def words(text):
    """Lower-cased words and punctuation marks of a caption."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def ngram_counts(tokens, order):
    return Counter(tuple(tokens[i : i + order]) for i in range(len(tokens) - order + 1))


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, max_order=4, smooth=True):
        matches, candidates = [0] * max_order, [0] * max_order
        translation_length = reference_length = 0
        for prediction, prediction_references in zip(predictions, references):
            tokens = words(prediction)
            reference_tokens = [words(reference) for reference in prediction_references]
            translation_length += len(tokens)
            reference_length += min((abs(len(r) - len(tokens)), len(r)) for r in reference_tokens)[1]
            for order in range(1, max_order + 1):
                counts = ngram_counts(tokens, order)
                clipped = Counter()
                for reference in reference_tokens:
                    clipped |= ngram_counts(reference, order)
                matches[order - 1] += sum((counts & clipped).values())
                candidates[order - 1] += sum(counts.values())
        if smooth:
            precisions = [(m + 1.0) / (c + 1.0) for m, c in zip(matches, candidates)]
        else:
            precisions = [m / c if c else 0.0 for m, c in zip(matches, candidates)]
        geometric_mean = math.exp(sum(math.log(p) for p in precisions) / max_order) if min(precisions) > 0 else 0.0
        ratio = translation_length / reference_length if reference_length else 0.0
        brevity_penalty = 1.0 if ratio > 1.0 else (math.exp(1.0 - 1.0 / ratio) if ratio > 0 else 0.0)
        return {
            "bleu": geometric_mean * brevity_penalty,
            "precisions": precisions,
            "brevity_penalty": brevity_penalty,
            "length_ratio": ratio,
            "translation_length": translation_length,
            "reference_length": reference_length,
        }
