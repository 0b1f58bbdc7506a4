"""Cross-modal retrieval recall@k between paired image and text embeddings, by cosine similarity."""

import datasets
import evaluate
import numpy as np
import torch
import torch.nn.functional as F


_DESCRIPTION = """
Row i of `predictions` (image embeddings) and row i of `references` (text embeddings) belong together. For each image
the texts are ranked by cosine similarity (and the images for each text); recall@k is the share of queries whose
partner ranks in the top k. A tie with the partner counts in its favour. Chance level is k / n.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `(d,)` float vectors): image embeddings.
    references (`list` of `(d,)` float vectors): the paired text embeddings.
    ks (`list` of `int`, defaults to [1, 5]): the cut-offs.
Returns:
    image_to_text_r{k}, text_to_image_r{k} for each k, and num_pairs.
Examples:
    >>> retrieval = evaluate.load("./metrics/retrieval")
    >>> retrieval.compute(predictions=image_latents, references=text_latents)["image_to_text_r1"]
"""


def partner_ranks(similarity):
    """0-based rank of the diagonal entry in each row of a square similarity matrix (ties count in its favour)."""
    return (similarity > similarity.diagonal()[:, None]).sum(dim=1)


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Retrieval(evaluate.Metric):
    def _info(self):
        vector = datasets.Sequence(datasets.Value("float32"))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": vector, "references": vector}),
        )

    def _compute(self, predictions, references, ks=(1, 5)):
        images = F.normalize(torch.as_tensor(np.asarray(predictions), dtype=torch.float32), dim=-1)
        texts = F.normalize(torch.as_tensor(np.asarray(references), dtype=torch.float32), dim=-1)
        similarity = images @ texts.T
        image_ranks, text_ranks = partner_ranks(similarity), partner_ranks(similarity.T)
        results = {}
        for k in ks:
            results[f"image_to_text_r{k}"] = (image_ranks < k).float().mean().item()
            results[f"text_to_image_r{k}"] = (text_ranks < k).float().mean().item()
        results["num_pairs"] = len(predictions)
        return results
