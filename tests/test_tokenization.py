"""The caption tokenizer: a byte-level BPE that survives save_pretrained -> AutoTokenizer."""

import subprocess
import sys

from conftest import REPO_ROOT
from transformers import AutoTokenizer

from tokenization_engraving import SPECIAL_TOKENS, train_tokenizer


CORPUS = [
    f"An engraving depicting {subject} {where}"
    for subject in ["a ship", "a lighthouse", "two figures", "a ruined abbey", "Don Quixote", "the moon"]
    for where in ["on a stormy sea", "beneath a crescent moon", "by a river", "in a forest", "at dawn"]
]


def test_special_tokens_take_the_first_ids_and_wrap_every_caption():
    tokenizer = train_tokenizer(CORPUS, vocab_size=400)
    assert [tokenizer.convert_tokens_to_ids(token) for token in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    ids = tokenizer("An engraving depicting a ship")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.bos_token_id not in ids[1:-1] and tokenizer.eos_token_id not in ids[1:-1]
    padded = tokenizer(["a ship", "An engraving depicting two figures"], padding=True)["input_ids"]
    assert padded[0][-1] == tokenizer.pad_token_id


def test_vocabulary_size_is_honoured_when_the_corpus_allows_it():
    rich_corpus = [f"{word}{number} engraving plate {number * 7}" for number in range(500) for word in ("fig", "pl")]
    assert len(train_tokenizer(rich_corpus, vocab_size=400)) == 400
    assert len(train_tokenizer(["a ship"], vocab_size=8000)) < 8000


def test_saved_tokenizer_reloads_with_identical_ids_and_exact_decoding(tmp_path):
    tokenizer = train_tokenizer(CORPUS, vocab_size=400)
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    texts = CORPUS + ["An engraving depicting Éponine — « unseen » words, 1862!"]
    for text in texts:
        assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
        assert reloaded.decode(reloaded(text)["input_ids"], skip_special_tokens=True) == text
    assert len(reloaded) == len(tokenizer)


def test_command_line_trains_on_a_saved_dataset(tiny_dataset_dir, tmp_path):
    output_dir = tmp_path / "tokenizer"
    result = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / "tokenization_engraving.py"),
            "--dataset_path",
            str(tiny_dataset_dir / "dataset"),
            "--output_dir",
            str(output_dir),
            "--vocab_size",
            "300",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    text = "An engraving depicting a cross on the right"
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
