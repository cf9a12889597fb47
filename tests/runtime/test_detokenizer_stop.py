"""StopStringMatcher tests; reference: a naive scan of the whole text, character by character."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kiln.runtime.detokenizer import StopStringMatcher


def feed(pieces, stop, include=False, finished=True):
    matcher = StopStringMatcher(stop, include_stop_str_in_output=include)
    emitted, reason = [], None
    for i, piece in enumerate(pieces):
        text, reason = matcher.process(piece, finished=finished and i == len(pieces) - 1)
        emitted.append(text)
        if reason is not None:
            break
    return matcher, emitted, reason


def naive(text, stop, include):
    """The output the whole text should produce: cut where a stop string first completes."""
    for end in range(1, len(text) + 1):
        done = [s for s in stop if text[:end].endswith(s)]
        if done:
            longest = max(done, key=len)  # same end: the one starting earliest
            return (text[:end] if include else text[:end - len(longest)]), longest
    return text, None


def test_stop_spanning_pieces_is_cut_before_it():
    _, emitted, reason = feed(["Hello wo", "rl", "d! more"], ["world"])
    assert reason == "world" and "".join(emitted) == "Hello "
    # Nothing that could still become the stop string was emitted early.
    assert emitted[:2] == ["Hello ", ""]


def test_include_stop_str_keeps_it():
    matcher, emitted, reason = feed(["Hello wo", "rl", "d! more"], ["world"], include=True)
    assert reason == "world" and "".join(emitted) == "Hello world" == matcher.output_text


def test_earliest_of_several_stops_wins():
    _, emitted, reason = feed(["a STOP1 b STOP2 c"], ["STOP2", "STOP1"])
    assert reason == "STOP1" and "".join(emitted) == "a "
    _, emitted, reason = feed(["a ST", "OP2 b STOP1"], ["STOP1", "STOP2"])
    assert reason == "STOP2" and "".join(emitted) == "a "


def test_held_back_tail_is_released():
    matcher = StopStringMatcher(["</end>"], include_stop_str_in_output=False)
    assert matcher.process("foo </e") == ("foo ", None)
    assert matcher.process("x bar <") == ("</ex bar ", None)
    assert matcher.flush() == "<"
    assert matcher.output_text == "foo </ex bar <" and not matcher.stopped


def test_no_stop_passes_text_through():
    _, emitted, reason = feed(["abc", "", "def"], [])
    assert emitted == ["abc", "", "def"] and reason is None


def test_nothing_emitted_after_stop():
    matcher = StopStringMatcher(["x"])
    assert matcher.process("abxcd") == ("ab", "x")
    assert matcher.process("more") == ("", None)
    assert matcher.flush() == "" and matcher.stop_reason == "x"


def test_empty_stop_string_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])


@settings(max_examples=300, deadline=None)
@given(
    text=st.text(alphabet="ab c", max_size=30),
    stop=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), max_size=3),
    include=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=30), max_size=8),
)
def test_any_split_matches_whole_text_scan(text, stop, include, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])] or [""]
    matcher, emitted, reason = feed(pieces, stop, include)
    expected_text, expected_reason = naive(text, stop, include)
    assert ("".join(emitted), reason) == (expected_text, expected_reason)
    assert matcher.output_text == expected_text
    # While streaming (before any stop), fewer than len(longest stop) characters are held back.
    if reason is None:
        longest = max((len(s) for s in stop), default=1)
        received = released = 0
        for piece, out in zip(pieces[:-1], emitted):
            received, released = received + len(piece), released + len(out)
            assert received - released <= longest - 1
