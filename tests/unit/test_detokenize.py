"""Incremental detokenization over tokenizers trained on the spot: byte-level and SentencePiece."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import ByteLevelBPETokenizer, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from tgserve.shard.detokenize import IncrementalDetokenizer, decode_token

CORPUS = [
    "Hello world, the quick brown fox jumps over the lazy dog.",
    "Café crème brûlée, naïve résumé, Straße, señor, über, Ångström.",
    "你好，世界。今天天气很好。我们去公园吧。",
    "日本語のテキストも少し。こんにちは！",
    "Emoji time 😀🎉👍🏽 and 🇫🇷 flags, ❤️ hearts.",
    "Numbers 12345 and symbols #$%&*() in code: def f(x): return x",
] * 4

TEXTS = [
    "Hello world",
    " leading space and  double  spaces",
    "Café crème brûlée à la carte",
    "你好，世界！今天天气很好",
    "emoji 😀🎉👍🏽🇫🇷❤️ mixed",
    "日本語とEnglishと😀が混ざる",
    "unseen 🚀🦄 龍 ŵ characters",
    "line one\nline two\n\n  indented",
]
REPLACEMENT = "\ufffd"


def _byte_level(tmp: Path) -> PreTrainedTokenizerFast:
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        CORPUS, vocab_size=320, min_frequency=1, special_tokens=["<|endoftext|>"],
        show_progress=False,
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
        clean_up_tokenization_spaces=False,
    )


def _sentencepiece_like(tmp: Path) -> PreTrainedTokenizerFast:
    """Llama-style: Metaspace pieces, BPE merges, <0xNN> byte fallback for rare characters."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=220, special_tokens=["<unk>", "<s>", "</s>"], limit_alphabet=70,
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    # The trainer cannot add byte pieces, so rebuild the model with them appended.
    tok.model.save(str(tmp))
    vocab = json.loads((tmp / "vocab.json").read_text())
    lines = (tmp / "merges.txt").read_text().splitlines()
    merges = [tuple(line.split(" ")) for line in lines if line and not line.startswith("#")]
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    tok.model = models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True)
    tok.decoder = decoders.Sequence([
        decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
        decoders.Strip(" ", 1, 0),
    ])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tokenizer(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    build = _byte_level if request.param == "byte_level" else _sentencepiece_like
    return build(tmp_path_factory.mktemp(request.param))


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _stream(tokenizer, prompt_ids: list[int], gen_ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    return [detok.step(tok) for tok in gen_ids]


def test_tokenizers_split_characters_into_bytes(tokenizer) -> None:
    # Guard for the tests below: some tokens must decode to half a character on their own.
    ids = _ids(tokenizer, "🚀🦄 龍 😀")
    assert any(REPLACEMENT in tokenizer.decode([i]) for i in ids)
    assert tokenizer.decode(ids) == "🚀🦄 龍 😀"


@pytest.mark.parametrize("text", TEXTS)
def test_stream_without_prompt_equals_full_decode(tokenizer, text: str) -> None:
    gen = _ids(tokenizer, text)
    pieces = _stream(tokenizer, [], gen)
    assert not any(REPLACEMENT in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(gen)


@pytest.mark.parametrize("text", TEXTS)
def test_stream_after_prompt_equals_the_added_text(tokenizer, text: str) -> None:
    prompt = _ids(tokenizer, "Bonjour 😀 le monde, 你好")
    gen = _ids(tokenizer, text)
    pieces = _stream(tokenizer, prompt, gen)
    assert not any(REPLACEMENT in piece for piece in pieces)
    full, before = tokenizer.decode(prompt + gen), tokenizer.decode(prompt)
    assert "".join(pieces) == full[len(before) :]


def test_multibyte_characters_are_held_back_until_complete(tokenizer) -> None:
    gen = _ids(tokenizer, "😀🎉👍🏽🚀龍")
    pieces = _stream(tokenizer, _ids(tokenizer, "Hi"), gen)
    assert "" in pieces  # some tokens only carried part of a character
    assert "".join(pieces).endswith("😀🎉👍🏽🚀龍")
    assert all(piece == "" or piece[-1] != REPLACEMENT for piece in pieces)


def test_leading_space_of_a_continuation_is_kept(tokenizer) -> None:
    full = _ids(tokenizer, "Hello world, the quick brown fox")
    prompt = _ids(tokenizer, "Hello world,")
    assert full[: len(prompt)] == prompt  # the split falls on a token boundary
    pieces = [p for p in _stream(tokenizer, prompt, full[len(prompt) :]) if p]
    assert pieces[0].startswith(" the") or pieces[0] == " "
    assert "".join(pieces) == " the quick brown fox"


def test_decode_token_keeps_offsets_while_holding_back(tokenizer) -> None:
    prompt = _ids(tokenizer, "Hello world")
    emoji = _ids(tokenizer, "🚀")  # not in the corpus: bytes in both tokenizers
    first_byte = next(i for i, t in enumerate(emoji) if REPLACEMENT in tokenizer.decode([t]))
    ids = prompt + emoji[: first_byte + 1]
    prefix, read = max(len(prompt) - 5, 0), len(prompt)
    assert decode_token(tokenizer, ids, prefix, read) == ("", prefix, read)
    ids = prompt + emoji
    text, new_prefix, new_read = decode_token(tokenizer, ids, prefix, read)
    assert text.endswith("🚀") and (new_prefix, new_read) == (read, len(ids))


def test_special_tokens_are_shown_unless_skipped(tokenizer) -> None:
    prompt = _ids(tokenizer, "Hello")
    eos = tokenizer.eos_token_id
    assert IncrementalDetokenizer(tokenizer, prompt).step(eos) == tokenizer.eos_token
    skipping = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=True)
    assert skipping.step(eos) == ""
    assert skipping.step(_ids(tokenizer, "Hello world")[-1]) != ""
