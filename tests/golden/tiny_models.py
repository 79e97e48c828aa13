"""Tiny random models of every supported architecture, saved to disk as a Hugging Face folder."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 512


def word_tokenizer(vocab_size: int = VOCAB) -> PreTrainedTokenizerFast:
    """Any id of the model decodes: one word per id."""
    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0")


def _config(arch: str):  # type: ignore[no-untyped-def]
    common = dict(vocab_size=VOCAB, eos_token_id=None, bos_token_id=None, pad_token_id=None)
    if arch == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, **common)
    llama_like = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False, **common,
    )
    if arch == "llama":
        return LlamaConfig(**llama_like)
    if arch == "llama-tied":
        return LlamaConfig(**{**llama_like, "tie_word_embeddings": True})
    if arch == "mistral":
        return MistralConfig(sliding_window=24, **llama_like)
    if arch == "qwen2":
        return Qwen2Config(**llama_like)
    # Both with a head_dim other than hidden / heads, as the released checkpoints have.
    if arch == "qwen3":
        return Qwen3Config(**{**llama_like, "head_dim": 32})
    if arch == "gemma":  # tied, as released
        return GemmaConfig(**{**llama_like, "head_dim": 32, "tie_word_embeddings": True})
    raise ValueError(arch)


ARCHS = ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "gemma", "gpt2"]
# transformers initialises norm weights to a constant (1, or Gemma's 0 for 1 + w), under which a
# norm applied to the wrong tensor or without its offset can go unseen; these get random ones.
RANDOM_NORMS = {"qwen3", "gemma"}


def build(arch: str, folder: Path, seed: int = 0):  # type: ignore[no-untyped-def]
    """Save a random model + tokenizer to `folder`; returns the transformers model (float32)."""
    torch.manual_seed(seed)
    config = _config(arch)
    # A wider init spreads the logits so float32 rounding never decides a greedy tie.
    config.initializer_range = 0.2
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    if arch in RANDOM_NORMS:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.add_(torch.randn_like(param) * 0.2)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    model.save_pretrained(folder)
    word_tokenizer().save_pretrained(folder)
    return model


def reference_greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float]]:  # type: ignore[no-untyped-def]
    """Greedy decoding with transformers' own forward and KV cache, EOS treated as any token.

    (generate() with min_new_tokens would mask EOS instead, changing the argmax.)
    """
    tokens: list[int] = []
    logprobs: list[float] = []
    past = None
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            out = model(x, past_key_values=past, use_cache=True)
            past = out.past_key_values
            lp = torch.log_softmax(out.logits[0, -1].float(), -1)
            token = int(lp.argmax())
            tokens.append(token)
            logprobs.append(lp[token].item())
            x = torch.tensor([[token]])
    return tokens, logprobs
