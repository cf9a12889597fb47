"""Structured output on the real SmolLM2 engine (CPU): every constrained output is in the
grammar's language (jsonschema / re.fullmatch / the choice list), a cut-off says "length",
and an unconstrained request in the same batch is untouched by its neighbours' grammars."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from kiln.runtime import LLM, SamplingParams
from kiln.runtime.grammar import GrammarError
from kiln.scheduler.sampling_params import StructuredOutput

pytestmark = pytest.mark.slow

PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 150},
                                           "city": {"enum": ["Paris", "Lyon"]}},
          "required": ["name", "age", "city"], "additionalProperties": False}
ASK = [{"role": "user", "content": "Describe a person called Alice who is 30 and lives in Paris, as JSON."}]


@pytest.fixture(scope="module")
def llm(smollm2_engine_dir):
    with LLM(smollm2_engine_dir, device="cpu", max_model_len=256, num_kv_cache_tokens=4096) as llm:
        yield llm


def test_constrained_outputs_are_in_the_language(llm):
    params = [
        SamplingParams(temperature=0.0, max_tokens=48, structured_output=StructuredOutput("json", json.dumps(PERSON))),
        SamplingParams(temperature=1.0, seed=7, max_tokens=48,
                       structured_output=StructuredOutput("json", json.dumps(PERSON))),
        SamplingParams(temperature=1.0, seed=1, max_tokens=12, structured_output=StructuredOutput("regex", r"[0-9]{3}-[a-c]{2}")),
        SamplingParams(temperature=1.0, seed=2, max_tokens=8,
                       structured_output=StructuredOutput("choice", json.dumps(["yes", "no", "maybe so"]))),
        SamplingParams(temperature=0.0, max_tokens=8,
                       structured_output=StructuredOutput("grammar", 'root ::= "ab" [0-9] ("x" | "yz")')),
    ]
    outs = llm.chat([ASK] * len(params), params, use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    assert all(o.outputs[0].finish_reason == "stop" for o in outs), texts
    for text in texts[:2]:
        jsonschema.validate(json.loads(text), PERSON)
    assert re.fullmatch(r"[0-9]{3}-[a-c]{2}", texts[2])
    assert texts[3] in ("yes", "no", "maybe so")
    assert re.fullmatch(r"ab[0-9](x|yz)", texts[4])


def test_cut_off_says_length_and_neighbours_are_untouched(llm):
    plain = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)
    alone = llm.chat([ASK], plain, use_tqdm=False)[0].outputs[0]
    cut = SamplingParams(temperature=0.0, max_tokens=4, structured_output=StructuredOutput("json_object"))
    both = llm.chat([ASK, ASK], [cut, plain], use_tqdm=False)
    short = both[0].outputs[0]
    assert short.finish_reason == "length" and len(short.token_ids) == 4 and short.text.startswith("{")
    assert both[1].outputs[0].token_ids == alone.token_ids


def test_bad_grammar_is_refused_when_added(llm):
    with pytest.raises(GrammarError):
        llm.generate("x", SamplingParams(structured_output=StructuredOutput("json", '{"type": "nonsense"}')),
                     use_tqdm=False)
    with pytest.raises(GrammarError):
        llm.generate("x", SamplingParams(structured_output=StructuredOutput("regex", "(unclosed")), use_tqdm=False)
