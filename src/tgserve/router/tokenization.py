"""The router's tokenizer: encode, decode, offsets, on worker threads so the loop never blocks."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def _byte_positions(text: str) -> list[int]:
    """positions[i] = byte offset of character i in UTF-8; positions[len(text)] = total bytes."""
    positions = [0] * (len(text) + 1)
    total = 0
    for i, ch in enumerate(text):
        positions[i] = total
        total += len(ch.encode("utf-8", "surrogatepass"))
    positions[len(text)] = total
    return positions


class RouterTokenizer:
    """Wraps a transformers tokenizer; blocking work goes to `validation_workers` threads."""

    def __init__(self, tokenizer: Any, validation_workers: int = 2) -> None:
        if validation_workers <= 0:
            raise ValueError("validation_workers must be > 0")
        self.tokenizer = tokenizer
        self._pool = ThreadPoolExecutor(
            max_workers=validation_workers, thread_name_prefix="tokenizer"
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])

    def tokenize_with_offsets(
        self, text: str, add_special_tokens: bool = True
    ) -> list[dict[str, Any]]:
        """Tokens with byte offsets into `text`; special tokens get empty text at offset 0."""
        try:
            enc = self.tokenizer(
                text, add_special_tokens=add_special_tokens, return_offsets_mapping=True
            )
        except NotImplementedError:  # a slow (Python) tokenizer has no offsets
            return self._tokenize_without_offsets(text, add_special_tokens)
        positions = _byte_positions(text)
        raw = text.encode("utf-8", "surrogatepass")
        tokens = []
        for token_id, (start_char, stop_char) in zip(
            enc["input_ids"], enc["offset_mapping"], strict=True
        ):
            start, stop = positions[start_char], positions[stop_char]
            tokens.append(
                {
                    "id": int(token_id),
                    "text": raw[start:stop].decode("utf-8", "replace"),
                    "start": start,
                    "stop": stop,
                }
            )
        return tokens

    def _tokenize_without_offsets(
        self, text: str, add_special_tokens: bool
    ) -> list[dict[str, Any]]:
        ids = self.encode(text, add_special_tokens)
        pieces = self.tokenizer.convert_ids_to_tokens(ids)
        return [
            {"id": int(i), "text": str(p), "start": 0, "stop": 0}
            for i, p in zip(ids, pieces, strict=True)
        ]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking tokenizer-bound function (e.g. validation) in the worker pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, fn, *args)

    async def encode_async(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self.run(self.encode, text, add_special_tokens)

    async def tokenize_async(
        self, text: str, add_special_tokens: bool = True
    ) -> list[dict[str, Any]]:
        return await self.run(self.tokenize_with_offsets, text, add_special_tokens)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def load(path: str, validation_workers: int = 2) -> RouterTokenizer:
    return RouterTokenizer(load_hf_tokenizer(path), validation_workers)


def load_hf_tokenizer(path: str) -> Any:
    """The tokenizer AutoTokenizer would build, without AutoTokenizer's import of torch.

    AutoTokenizer goes through transformers' config classes, which import torch: resident
    memory in a process that never runs a tensor. The class named by the folder's
    tokenizer_config.json is the one AutoTokenizer would pick; only when that name is missing or
    unknown does AutoTokenizer itself decide.
    """
    import transformers  # heavy import, only when a real model is served

    config = Path(path) / "tokenizer_config.json"
    name = json.loads(config.read_text()).get("tokenizer_class") if config.is_file() else None
    for candidate in (f"{name}Fast", name) if name else ():
        try:
            cls = getattr(transformers, candidate, None)
        except (ImportError, RuntimeError):  # a class whose backend is not installed
            cls = None
        if cls is not None and hasattr(cls, "from_pretrained"):
            return cls.from_pretrained(path)
    return transformers.AutoTokenizer.from_pretrained(path)
