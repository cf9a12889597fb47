"""Tool-call parsing (server/tool_calls.py) and fill-in-the-middle prompts (server/fim.py),
without a model: streamed parsing at every split point adds up to the whole-message parse,
forced-call grammars accept exactly the calls the parser reads back (xgrammar as the
reference matcher), FIM prompts are built from the tokenizer's own FIM tokens."""

from __future__ import annotations

import json

import pytest

from kiln.server.fim import fim_prompt_ids, fim_template
from kiln.server.serving_chat import _ChoiceTools
from kiln.server.tool_calls import HERMES, LLAMA3_JSON, forced_tool_constraint, tool_format_for

CALL = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
TOOLS = [{"name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                             "required": ["zone"], "additionalProperties": False}}]


def _streamed(fmt, text: str, cut: int) -> tuple[str, list[tuple[str, str]]]:
    parser = fmt.new_parser()
    content, calls = "", []
    for piece in (text[:cut], text[cut:]):
        c, more = parser.feed(piece)
        content, calls = content + c, calls + more
    c, more = parser.finish()
    return content + c, [(x.name, json.loads(x.arguments)) for x in calls + more]


@pytest.mark.parametrize("fmt, text, content, calls", [
    (HERMES, "Sure. " + CALL + "\n" + CALL.replace("CET", "UTC"), "Sure.",
     [("get_time", {"zone": "CET"}), ("get_time", {"zone": "UTC"})]),
    (HERMES, CALL, None, [("get_time", {"zone": "CET"})]),
    (HERMES, "<tool_call>\nnot json\n</tool_call> and <tool_ca", "<tool_call>\nnot json\n</tool_call> and <tool_ca",
     []),
    (HERMES, "a < b ", "a < b ", []),
    (LLAMA3_JSON, '<|python_tag|>{"name": "f", "parameters": {"x": 1}}; {"name": "g", "parameters": {}}', None,
     [("f", {"x": 1}), ("g", {})]),
    (LLAMA3_JSON, "{not a call}", "{not a call}", []),
    (LLAMA3_JSON, "It is 3 pm.", "It is 3 pm.", []),
])
def test_streamed_parse_at_every_split_equals_the_whole_parse(fmt, text, content, calls):
    whole_content, whole_calls = fmt.parse(text)
    assert whole_content == content
    assert [(c.name, json.loads(c.arguments)) for c in whole_calls] == calls
    for cut in range(len(text) + 1):
        assert _streamed(fmt, text, cut) == (content or "", calls)


def test_registry_picks_the_format_from_the_template():
    assert tool_format_for("{{ '<|python_tag|>' }}{% for t in tools %}") is LLAMA3_JSON
    assert tool_format_for("{% if tools %}<tool_call>{% endif %}") is HERMES
    assert tool_format_for("") is HERMES


@pytest.mark.parametrize("fmt", [HERMES, LLAMA3_JSON])
def test_forced_call_grammar_accepts_what_the_parser_reads(fmt):
    import xgrammar as xgr  # a runtime dependency (pyproject): missing it is a failure, not a skip
    tag = json.loads(forced_tool_constraint(fmt, "named", TOOLS, parallel=False).spec)
    grammar = xgr.Grammar.from_structural_tag(json.dumps(tag))
    good = fmt.begin("get_time") + '{"zone": "CET"}' + fmt.end
    matcher = xgr.testing._get_matcher_from_grammar(grammar)  # a private helper: a release without it fails here
    assert matcher.accept_string(good) and matcher.is_terminated()
    bad = xgr.testing._get_matcher_from_grammar(grammar)
    assert not bad.accept_string(fmt.begin("get_time") + '{"zone": 3}' + fmt.end)
    assert [(c.name, c.arguments) for c in fmt.parse(good)[1]] == [("get_time", '{"zone": "CET"}')]
    assert forced_tool_constraint(fmt, "auto", TOOLS, parallel=True) is None


def test_fim_prompt_uses_the_tokenizers_fim_tokens(smollm2_hf_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_hf_dir)
    assert fim_template(tok) is None  # SmolLM2 has no FIM tokens: serve-llm answers 400 to suffix
    tok.add_special_tokens({"additional_special_tokens": ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]})
    template, ids = fim_template(tok)
    assert template.name == "qwen2.5-coder"
    prompt = fim_prompt_ids(tok, ids, "def f(x):\n", "\n    return y")
    assert tok.decode(prompt) == "<|fim_prefix|>def f(x):\n<|fim_suffix|>\n    return y<|fim_middle|>"
    # Text that only looks like a FIM token stays text.
    assert ids[0] not in fim_prompt_ids(tok, ids, "<|fim_prefix|>", "")[1:]


@pytest.mark.parametrize("parallel, expected", [(True, ["CET", "UTC"]), (False, ["CET"])])
def test_streamed_call_deltas_keep_only_the_first_call_without_parallel_tool_calls(parallel, expected):
    text = "Sure. " + CALL + "\n" + CALL.replace("CET", "UTC")
    for cut in (0, 20, len(CALL) + 9, len(text)):
        tools = _ChoiceTools(HERMES.new_parser(), parallel)
        deltas = tools.feed(text[:cut], False)[1] + tools.feed(text[cut:], True)[1]
        names = [d for d in deltas if "id" in d]
        args = [json.loads(d["function"]["arguments"])["zone"] for d in deltas if "id" not in d]
        assert [d["index"] for d in names] == list(range(len(expected)))
        assert args == expected and tools.count == len(expected)
