"""StoppingCriteria: length, then EOS, then stop sequences, token by token."""

from __future__ import annotations

import pytest

from tgserve.shard.sampling.params import StoppingParams
from tgserve.shard.sampling.stopping import FinishReason, StoppingCriteria

EOS = frozenset({2, 7})
L, E, S = FinishReason.LENGTH, FinishReason.EOS_TOKEN, FinishReason.STOP_SEQUENCE

# (params, [(token, text), ...], expected reason after each step)
CASES = [
    ("length", StoppingParams(max_new_tokens=3), [(5, "a"), (5, "b"), (5, "c")], [None, None, L]),
    ("eos", StoppingParams(max_new_tokens=9), [(5, "a"), (2, "</s>")], [None, E]),
    ("second eos id", StoppingParams(max_new_tokens=9), [(7, "")], [E]),
    ("ignore eos", StoppingParams(max_new_tokens=9, ignore_eos=True), [(2, "x"), (7, "y")],
     [None, None]),
    ("length beats eos", StoppingParams(max_new_tokens=2), [(5, "a"), (2, "")], [None, L]),
    ("eos beats stop", StoppingParams(max_new_tokens=9, stop_sequences=("end",)),
     [(5, "the "), (2, "end")], [None, E]),
    ("stop in one token", StoppingParams(max_new_tokens=9, stop_sequences=("###",)),
     [(5, "hi"), (6, " ###")], [None, S]),
    ("stop across tokens", StoppingParams(max_new_tokens=9, stop_sequences=("User:",)),
     [(5, "ok\n"), (6, "Us"), (6, ""), (6, "er"), (6, ":")], [None, None, None, None, S]),
    ("second stop", StoppingParams(max_new_tokens=9, stop_sequences=("zz", "\n\n")),
     [(5, "a\n"), (5, "\n")], [None, S]),
    ("stop then newline", StoppingParams(max_new_tokens=9, stop_sequences=("STOP",)),
     [(5, "a"), (5, "STOP\n")], [None, S]),
    ("stop mid text is not at end", StoppingParams(max_new_tokens=9, stop_sequences=("ab",)),
     [(5, "xab c")], [None]),
    ("no stop", StoppingParams(max_new_tokens=9, stop_sequences=("never",)),
     [(5, "nev"), (5, "e"), (5, " ever")], [None, None, None]),
    ("empty stop ignored", StoppingParams(max_new_tokens=9, stop_sequences=("",)), [(5, "a")],
     [None]),
]


@pytest.mark.parametrize(("params", "steps", "expected"), [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_table(params: StoppingParams, steps: list, expected: list) -> None:
    criteria = StoppingCriteria(EOS, params)
    got = [criteria(token, text) for token, text in steps]
    assert got == expected
    assert criteria.current_tokens == len(steps)


def test_long_stop_sequence_spanning_many_tokens() -> None:
    stop = "x" * 400 + "!"
    criteria = StoppingCriteria(EOS, StoppingParams(max_new_tokens=10_000, stop_sequences=(stop,)))
    assert all(criteria(5, "x" * 10) is None for _ in range(60))
    assert criteria(5, "!") is FinishReason.STOP_SEQUENCE


def test_long_output_keeps_matching_at_the_end() -> None:
    criteria = StoppingCriteria(EOS, StoppingParams(max_new_tokens=10_000, stop_sequences=("<|",)))
    for _ in range(500):
        assert criteria(5, "lorem ipsum ") is None
    assert criteria(5, "<") is None
    assert criteria(5, "|") is FinishReason.STOP_SEQUENCE


def test_finish_reason_values_match_the_proto() -> None:
    from tgserve.pb import generate_pb2

    assert FinishReason.LENGTH == generate_pb2.FINISH_REASON_LENGTH
    assert FinishReason.EOS_TOKEN == generate_pb2.FINISH_REASON_EOS_TOKEN
    assert FinishReason.STOP_SEQUENCE == generate_pb2.FINISH_REASON_STOP_SEQUENCE
