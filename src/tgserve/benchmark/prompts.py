"""Deterministic benchmark prompts: seeded prose from a fixed word list, no dataset download."""

from __future__ import annotations

import random
from dataclasses import dataclass

# Common short English words: each is a single token (with its leading space) in the GPT-2,
# Llama and SmolLM BPE vocabularies, so one word is close to one token.
WORDS: tuple[str, ...] = tuple(
    """
    the a of and to in is was for on with as at by from that this it he she they we you his her
    their our its one two three four five six ten first last new old good great small large long
    little big high low young early late same other next few many more most much some each every
    all both only own such very well just also still even back then now here there where when
    how why what which who time year day week night morning evening life world city town house
    home room door window road river water fire light air sun moon star tree field garden hill
    sea ship boat car train school book story letter word name voice hand eye face head heart
    mind friend family father mother child man woman people king queen army war peace game music
    song paper table chair bread food money work job plan idea problem question answer reason
    way end part side place point fact case group number power state land country market village
    came went saw made said told found gave took left kept brought thought knew felt heard began
    ran walked looked turned stood sat lived moved opened closed carried wrote read played asked
    called wanted needed tried helped started stopped waited watched showed used learned built
    bright dark cold warm quiet loud slow fast clear strong soft hard true free happy sad ready
    near far under over after before into through around across along behind between against
    """.split()  # noqa: SIM905 (a prose block reads better than 254 quoted words)
)

MIN_TOKENS = 100
MAX_TOKENS = 300
# Triangular(100, 300, mode=140) has mean (100 + 300 + 140) / 3 = 180 tokens.
MODE_TOKENS = 140


@dataclass(frozen=True)
class Prompt:
    """One benchmark prompt and its estimated length in tokens of a typical BPE tokenizer."""

    index: int
    text: str
    estimated_tokens: int


def _sentence(rng: random.Random) -> tuple[str, int]:
    """A sentence of 6-16 words and its estimated token count (words plus punctuation)."""
    num_words = rng.randint(6, 16)
    words = [rng.choice(WORDS) for _ in range(num_words)]
    words[0] = words[0].capitalize()
    tokens = num_words + 1  # the final period
    if num_words >= 10 and rng.random() < 0.5:
        cut = rng.randint(3, num_words - 3)
        words[cut] += ","
        tokens += 1
    return " ".join(words) + ".", tokens


def make_prompt(index: int, target_tokens: int, rng: random.Random) -> Prompt:
    """Prose of whole sentences whose estimated length is at least `target_tokens`."""
    sentences: list[str] = []
    total = 0
    while total < target_tokens:
        text, tokens = _sentence(rng)
        sentences.append(text)
        total += tokens
    return Prompt(index=index, text=" ".join(sentences), estimated_tokens=total)


def make_prompts(num_prompts: int = 64, seed: int = 0) -> list[Prompt]:
    """`num_prompts` prompts of ~100-300 tokens (mean ~180); the same seed gives the same set."""
    if num_prompts < 1:
        raise ValueError(f"num_prompts must be >= 1, got {num_prompts}")
    rng = random.Random(seed)
    prompts = []
    for index in range(num_prompts):
        # A sentence can overshoot the target by up to 17 tokens, so aim a little lower.
        target = round(rng.triangular(MIN_TOKENS, MAX_TOKENS - 17, MODE_TOKENS - 8))
        prompts.append(make_prompt(index, target, rng))
    return prompts


# Warmup prompts come from their own set too (a seed no concurrency level uses).
WARMUP_LEVEL = 0


def level_prompts(num_prompts: int, seed: int, concurrency: int) -> list[Prompt]:
    """The prompt set of one concurrency level (or WARMUP_LEVEL): every server gets the same one,
    and no two levels share prompts, so no server answers a level from a prefix cache that an
    earlier level (or the warmup) filled. Prefix caching is measured only where a workload asks."""
    return make_prompts(num_prompts, seed * 100_003 + concurrency)
