"""Byte-level BPE tokenizer for Engraving captions, trained on a dataset's captions."""

import argparse

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast


SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<unk>"]


def train_tokenizer(texts, vocab_size=8000, min_frequency=2):
    """
    Trains a byte-level BPE on an iterable of strings and wraps it as a `PreTrainedTokenizerFast`.

    The special tokens take ids 0-3 (`<pad> <bos> <eos> <unk>`), matching `EngravingConfig`'s defaults, and every
    encoding is wrapped as `<bos> ... <eos>`. The vocabulary has at most `vocab_size` entries: fewer when the corpus
    has fewer merges to offer. `save_pretrained` writes it and `AutoTokenizer.from_pretrained` loads it back.
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos, eos = tokenizer.token_to_id("<bos>"), tokenizer.token_to_id("<eos>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", bos), ("<eos>", eos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="right",
    )


def parse_args():
    parser = argparse.ArgumentParser(description="Train the caption tokenizer on a saved DatasetDict's captions.")
    parser.add_argument(
        "--dataset_path", required=True, help="A DatasetDict saved with save_to_disk, with a `caption` column."
    )
    parser.add_argument("--output_dir", required=True, help="Where to save the tokenizer.")
    parser.add_argument(
        "--vocab_size", type=int, default=8000, help="Largest vocabulary size, special tokens included."
    )
    parser.add_argument("--split", default="train", help="Which split's captions to train on.")
    return parser.parse_args()


def main():
    from datasets import load_from_disk

    args = parse_args()
    captions = load_from_disk(args.dataset_path)[args.split]["caption"]
    tokenizer = train_tokenizer(captions, vocab_size=args.vocab_size)
    tokenizer.save_pretrained(args.output_dir)
    print(f"Trained a {len(tokenizer)}-token BPE on {len(captions)} captions; saved to {args.output_dir}.")


if __name__ == "__main__":
    main()
