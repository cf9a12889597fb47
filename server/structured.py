"""The one output constraint a request asks for, from whichever field asked: OpenAI's
``response_format`` (``json_object``, ``json_schema``), the vLLM-style extras ``guided_json``,
``guided_regex``, ``guided_choice`` and ``guided_grammar`` (EBNF), or, for chat, a
``tool_choice`` of "required" or a named function (server/tool_calls.py builds that one).

At most one may be sent; the field that sent it names the 400 when it does not compile.
"""

from __future__ import annotations

import json
from typing import Any

from kiln.scheduler.sampling_params import StructuredOutput
from kiln.server.errors import bad_request


def requested_constraint(req: Any) -> tuple[StructuredOutput, str] | None:
    """(constraint, the field it came from) of a chat or completions request, None without one."""
    found: list[tuple[StructuredOutput, str]] = []
    response_format = _from_response_format(req.response_format)
    if response_format is not None:
        found.append((response_format, "response_format"))
    if req.guided_json is not None:
        found.append((StructuredOutput("json", _schema_text(req.guided_json, "guided_json")), "guided_json"))
    if req.guided_regex is not None:
        found.append((StructuredOutput("regex", req.guided_regex), "guided_regex"))
    if req.guided_choice is not None:
        if not req.guided_choice or not all(req.guided_choice):
            raise bad_request("guided_choice must be a non-empty list of non-empty strings.", "guided_choice")
        found.append((StructuredOutput("choice", json.dumps(req.guided_choice, ensure_ascii=False)), "guided_choice"))
    if req.guided_grammar is not None:
        found.append((StructuredOutput("grammar", req.guided_grammar), "guided_grammar"))
    if len(found) > 1:
        raise bad_request(f"{found[1][1]} cannot be combined with {found[0][1]}: send one output constraint.",
                          found[1][1])
    return found[0] if found else None


def _from_response_format(fmt: Any) -> StructuredOutput | None:
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutput("json_object")
    if fmt.type == "json_schema":
        if fmt.json_schema is None or not isinstance(fmt.json_schema.schema_, dict):
            raise bad_request("response_format of type json_schema needs json_schema.schema, a JSON schema object.",
                              "response_format.json_schema.schema")
        return StructuredOutput("json", json.dumps(fmt.json_schema.schema_, ensure_ascii=False))
    raise bad_request(f"response_format type {fmt.type!r} is not one of text, json_object, json_schema.",
                      "response_format.type")


def _schema_text(schema: str | dict[str, Any], param: str) -> str:
    if isinstance(schema, dict):
        return json.dumps(schema, ensure_ascii=False)
    try:
        decoded = json.loads(schema)
    except json.JSONDecodeError:
        decoded = None
    if not isinstance(decoded, dict):
        raise bad_request(f"{param} must be a JSON schema object (or its JSON text).", param)
    return schema


def checked_constraint(tokenizer: Any, constraint: tuple[StructuredOutput, str] | None) -> None:
    """Raise a 400 naming the field unless the constraint compiles (runs in a tokenizer lane:
    xgrammar is imported on first use)."""
    if constraint is None:
        return
    from kiln.runtime.grammar import GrammarError, check_structured_output

    so, param = constraint
    if tokenizer is None:
        raise bad_request("Structured output needs a tokenizer, and this model has none.", param)
    try:
        check_structured_output(so, param)
    except GrammarError as e:
        raise bad_request(str(e), e.param) from None
