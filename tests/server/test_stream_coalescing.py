"""GenerationStream merges the outputs that piled up while its consumer was busy."""

from __future__ import annotations

import asyncio

import pytest

from kiln.runtime.outputs import CompletionOutput, RequestMetrics, RequestOutput, TokenLogprob
from kiln.server.async_engine import GenerationStream


def output(rid: str, index: int, tokens: list[int], new: list[int], finished: bool = False) -> RequestOutput:
    choice = CompletionOutput(index=index, text="".join(map(chr, tokens)), token_ids=tokens,
                              finish_reason="length" if finished else None,
                              logprobs=[TokenLogprob(t, -1.0) for t in tokens],
                              delta_text="".join(map(chr, new)), delta_token_ids=new,
                              delta_logprobs=[TokenLogprob(t, -1.0) for t in new])
    return RequestOutput(rid, None, [1], [choice], finished, RequestMetrics(arrival_time=0.0))


def collect(stream: GenerationStream) -> list[RequestOutput]:
    async def run() -> list[RequestOutput]:
        return [item async for item in stream]
    return asyncio.run(run())


def test_waiting_outputs_of_a_request_merge_into_one():
    stream = GenerationStream(["a", "b"])
    stream.put(output("a", 0, [65], [65]))
    stream.put(output("b", 0, [70], [70]))
    stream.put(output("a", 1, [66], [66]))  # another choice of a
    stream.put(output("a", 0, [65, 67], [67], finished=True))
    stream.put(output("b", 0, [70, 71], [71], finished=True))
    stream.put(output("a", 1, [66, 68], [68], finished=True))
    got = collect(stream)
    assert [o.request_id for o in got] == ["a", "b"] and all(o.finished for o in got)
    a0, a1 = got[0].outputs
    assert (a0.index, a0.delta_token_ids, a0.delta_text, a0.finish_reason) == (0, [65, 67], "AC", "length")
    assert (a1.index, a1.delta_token_ids) == (1, [66, 68])
    assert [lp.token_id for lp in a0.delta_logprobs] == [65, 67] and a0.token_ids == [65, 67]
    assert got[1].outputs[0].delta_token_ids == [70, 71]


def test_an_error_after_waiting_outputs_is_raised_after_them():
    stream = GenerationStream(["a"])
    stream.put(output("a", 0, [65], [65]))
    stream.put(RuntimeError("engine died"))
    seen = []

    async def run() -> None:
        async for item in stream:
            seen.append(item)

    with pytest.raises(RuntimeError, match="engine died"):
        asyncio.run(run())
    assert [o.outputs[0].delta_token_ids for o in seen] == [[65]]
