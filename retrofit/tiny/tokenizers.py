"""Tokenizers of tiny models, with LLaDA-MoE's special tokens: a byte-level one, one padded to a real model's
vocabulary (full-size presets), and a BPE trained on text (the embedded ``tiny``)."""

from __future__ import annotations

from pathlib import Path

from retrofit.io.tokenizer_files import EOS_TOKEN, MASK_TOKEN
from retrofit.io.writer import write_json


def _byte_level(model):
    from tokenizers import Tokenizer, decoders, pre_tokenizers

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def write_byte_tokenizer(directory: Path) -> dict[str, int]:
    """A byte-level BPE with no merges: 256 byte tokens, then ``<|endoftext|>`` and ``<|mask|>``.

    Returns the special token ids. Loadable with ``transformers.PreTrainedTokenizerFast.from_pretrained``.
    """
    from tokenizers import models
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    tok = _byte_level(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens([EOS_TOKEN, MASK_TOKEN])
    return _save(tok, directory)


def write_padded_byte_tokenizer(directory: Path, vocab_size: int, eos_token_id: int,
                                mask_token_id: int) -> dict[str, int]:
    """A byte-level tokenizer with exactly ``vocab_size`` ids, for a checkpoint whose real vocabulary is not at
    hand: the 256 byte tokens first, ``<|endoftext|>`` and ``<|mask|>`` at the given ids, and a
    ``<|reserved_ID|>`` filler at every other id. Only byte tokens ever come out of encoding (there are no
    merges), so text round-trips; the model's embedding rows all have a token.

    Returns the special token ids. Loadable with ``transformers.PreTrainedTokenizerFast.from_pretrained``.
    """
    from tokenizers import models
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    specials = {eos_token_id: EOS_TOKEN, mask_token_id: MASK_TOKEN}
    if eos_token_id == mask_token_id or not all(len(alphabet) <= i < vocab_size for i in specials):
        raise ValueError(f"special ids eos {eos_token_id}, mask {mask_token_id} must differ and lie in "
                         f"[{len(alphabet)}, {vocab_size})")
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab.update({specials.get(i, f"<|reserved_{i}|>"): i for i in range(len(alphabet), vocab_size)})
    tok = _byte_level(models.BPE(vocab=vocab, merges=[]))
    tok.add_special_tokens([EOS_TOKEN, MASK_TOKEN])  # already in the vocabulary: they keep their ids
    ids = _save(tok, directory)
    if ids != {EOS_TOKEN: eos_token_id, MASK_TOKEN: mask_token_id} or tok.get_vocab_size() != vocab_size:
        raise ValueError(f"tokenizer came out with special ids {ids} and {tok.get_vocab_size()} tokens")
    return ids


def train_bpe_tokenizer(texts, vocab_size: int, directory: Path) -> dict[str, int]:
    """Train a byte-level BPE of ``vocab_size`` tokens on ``texts`` (the two special tokens included)."""
    from tokenizers import models, trainers
    from tokenizers.pre_tokenizers import ByteLevel

    tok = _byte_level(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS_TOKEN, MASK_TOKEN],
                                  initial_alphabet=ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return _save(tok, directory)


def _save(tok, directory: Path) -> dict[str, int]:
    tok.save(str(directory / "tokenizer.json"))
    ids = {EOS_TOKEN: tok.token_to_id(EOS_TOKEN), MASK_TOKEN: tok.token_to_id(MASK_TOKEN)}
    write_json(directory / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "mask_token": MASK_TOKEN,
        "model_max_length": 4096,
    })
    write_json(directory / "special_tokens_map.json",
               {"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN, "mask_token": MASK_TOKEN})
    return ids
