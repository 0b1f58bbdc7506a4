"""Form, diversity and originality of generated captions: well-formed share, distinct-n, copies and invented words."""

import re

import datasets
import evaluate


_DESCRIPTION = """
Checks generated captions without a reference:
- well_formed: share that start with the style prefix (default "An engraving"), end cleanly (on a content word or a
  closing mark, not on a dangling "of", "the", "and", comma ...) and contain no repetition loop (a word repeated back
  to back, or a word trigram that occurs twice);
- distinct_1 / distinct_2: distinct word unigrams / bigrams over all unigrams / bigrams of the set (Li et al., 2016);
- copied: share identical (case and spacing aside) to one of `training_captions`;
- known_words: share made only of words that occur in `training_captions`: a new caption that recombines known words
  passes, a misspelt or invented word ("Enrotons") fails it, which well_formed does not see;
- novel_known_words: share that is not a copy and is made only of known words, the captions that are both new and
  readable.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str`): the captions to check.
    training_captions (`list` of `str`, *optional*): the training captions; without them `copied` is not reported.
    prefix (`str`, defaults to "An engraving"): the style prefix a well-formed caption starts with.
Returns:
    well_formed, has_prefix, clean_ending, no_loop (shares in [0, 1]), distinct_1, distinct_2, and with
    `training_captions` copied, known_words and novel_known_words.
Examples:
    >>> caption_quality = evaluate.load("./metrics/caption_quality")
    >>> caption_quality.compute(predictions=captions, training_captions=train_captions)["well_formed"]
"""

_CITATION = """
@inproceedings{li2016diversity,
  title={A Diversity-Promoting Objective Function for Neural Conversation Models},
  author={Li, Jiwei and Galley, Michel and Brockett, Chris and Gao, Jianfeng and Dolan, Bill},
  booktitle={NAACL}, year={2016}
}
"""

DANGLING_WORDS = {
    "a",
    "an",
    "the",
    "of",
    "and",
    "or",
    "with",
    "in",
    "on",
    "at",
    "by",
    "to",
    "from",
    "for",
    "de",
    "la",
    "le",
}


def normalize(caption):
    return " ".join(caption.lower().split())


def words(caption):
    return re.findall(r"\w+", caption.lower())


def has_clean_ending(caption):
    """True when the caption ends on a content word or closing mark rather than a cut-off phrase."""
    caption = caption.strip()
    if not caption or caption[-1] in ",;:-&(":
        return False
    last_words = words(caption)
    return bool(last_words) and last_words[-1] not in DANGLING_WORDS


def has_loop(caption):
    """True when a word repeats back to back or a word trigram occurs twice."""
    tokens = words(caption)
    if any(a == b for a, b in zip(tokens, tokens[1:])):
        return True
    trigrams = [tuple(tokens[i : i + 3]) for i in range(len(tokens) - 2)]
    return len(set(trigrams)) < len(trigrams)


def distinct_n(captions, n):
    ngrams = [tuple(t[i : i + n]) for t in (c.lower().split() for c in captions) for i in range(len(t) - n + 1)]
    return len(set(ngrams)) / len(ngrams) if ngrams else 0.0


def share(flags):
    flags = list(flags)
    return sum(flags) / len(flags) if flags else 0.0


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CaptionQuality(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, training_captions=None, prefix="An engraving"):
        prefixed = [caption.strip().startswith(prefix) for caption in predictions]
        clean = [has_clean_ending(caption) for caption in predictions]
        no_loop = [not has_loop(caption) for caption in predictions]
        results = {
            "well_formed": share(p and c and n for p, c, n in zip(prefixed, clean, no_loop)),
            "has_prefix": share(prefixed),
            "clean_ending": share(clean),
            "no_loop": share(no_loop),
            "distinct_1": distinct_n(predictions, 1),
            "distinct_2": distinct_n(predictions, 2),
        }
        if training_captions is not None:
            seen = {normalize(caption) for caption in training_captions}
            vocabulary = {word for caption in training_captions for word in words(caption)}
            copied = [normalize(caption) in seen for caption in predictions]
            known = [set(words(caption)) <= vocabulary for caption in predictions]
            results["copied"] = share(copied)
            results["known_words"] = share(known)
            results["novel_known_words"] = share(k and not c for k, c in zip(known, copied))
        return results
