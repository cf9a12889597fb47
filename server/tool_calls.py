"""Tool calling: the text formats models are trained to call tools in, keyed by the chat template.

A ``ToolFormat`` knows how one family writes calls: how to find them in generated text (the
same ``ToolCallParser`` serves streamed and whole responses, so streamed deltas always add up
to the non-streamed message), the xgrammar structural tag that forces valid calls for
``tool_choice: "required"`` or a named function (arguments constrained to the function's
parameter schema), and how to write calls and results into a prompt for a template that
knows nothing of tools. The registry picks the format from the chat template's text:

- ``llama3_json``: Llama 3.1/3.2 templates (``<|python_tag|>``, ``{"name": ..., "parameters": {...}}``,
  several calls separated by ``;``)
- ``hermes``: ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` (Hermes 2 Pro,
  Qwen2.5, and every template without tool support: SmolLM2's ignores ``tools``, so Kiln writes
  the tools into the system prompt in this format and renders earlier calls and results as text).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Callable

from kiln.scheduler.sampling_params import StructuredOutput

HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> "
    "XML tags. You may call one or more functions to assist with the user query. Don't make assumptions about "
    "what values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\n"
    "For each function call return a json object with function name and arguments within <tool_call></tool_call> "
    'XML tags as follows:\n<tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


@dataclass(frozen=True)
class ToolCall:
    """One parsed call; ``arguments`` is JSON text, as the OpenAI API carries it."""

    name: str
    arguments: str
    id: str = ""

    def to_openai(self, index: int | None = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _call_from(obj: Any, args_key: str) -> ToolCall | None:
    """A call from a decoded JSON object holding a string ``name`` and object arguments."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args = obj.get(args_key, obj.get("arguments", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False), new_call_id())


class ToolCallParser:
    """Splits generated text into content and calls as it arrives (``feed``), then ``finish``.

    Content is passed on at once except what could still be the start of a call and trailing
    whitespace, which is held until something else follows and dropped when a call does (a
    message that is only calls has no content); so every split of a text parses alike. A call is emitted once it is complete and parses; one that does not
    stays content, as text.
    """

    def __init__(self, fmt: ToolFormat) -> None:
        self.fmt = fmt
        self._pending_space = ""
        self._had_content = False

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        raise NotImplementedError

    def finish(self) -> tuple[str, list[ToolCall]]:
        raise NotImplementedError

    def _content(self, text: str) -> str:
        if not text:
            return ""
        # Trailing whitespace is held: dropped if a call follows, else passed on with what follows.
        head = text.rstrip()
        if not head:
            self._pending_space += text
            return ""
        out, self._pending_space = self._pending_space + head, text[len(head):]
        self._had_content = True
        return out

    def _call_seen(self) -> None:
        self._pending_space = ""  # whitespace around calls is not content

    def _flush(self) -> str:
        """Held whitespace at the end of a message with content (one with only calls has none)."""
        out, self._pending_space = (self._pending_space if self._had_content else ""), ""
        return out


class _HermesParser(ToolCallParser):
    OPEN, CLOSE = "<tool_call>", "</tool_call>"

    def __init__(self, fmt: ToolFormat) -> None:
        super().__init__(fmt)
        self._buffer = ""
        self._in_call = False

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buffer += text
        content, calls = [], []
        while True:
            if not self._in_call:
                at = self._buffer.find(self.OPEN)
                if at < 0:
                    keep = _partial_suffix(self._buffer, self.OPEN)
                    content.append(self._content(self._buffer[: len(self._buffer) - keep]))
                    self._buffer = self._buffer[len(self._buffer) - keep:]
                    return "".join(content), calls
                content.append(self._content(self._buffer[:at]))
                self._buffer, self._in_call = self._buffer[at + len(self.OPEN):], True
            at = self._buffer.find(self.CLOSE)
            if at < 0:
                return "".join(content), calls
            body, self._buffer, self._in_call = self._buffer[:at], self._buffer[at + len(self.CLOSE):], False
            call = _decode_call(body, "arguments")
            if call is None:
                content.append(self._content(self.OPEN + body + self.CLOSE))
            else:
                self._call_seen()
                calls.append(call)

    def finish(self) -> tuple[str, list[ToolCall]]:
        rest = (self.OPEN if self._in_call else "") + self._buffer
        self._buffer, self._in_call = "", False
        return self._content(rest) + self._flush(), []


class _Llama3JsonParser(ToolCallParser):
    """A message that starts with ``<|python_tag|>`` or ``{`` is held whole and parsed at the end."""

    TAG = "<|python_tag|>"

    def __init__(self, fmt: ToolFormat) -> None:
        super().__init__(fmt)
        self._buffer = ""
        self._mode: str | None = None  # None: undecided; "json" or "text"

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if self._mode == "text":
            return self._content(text), []
        self._buffer += text
        head = self._buffer.lstrip()
        if self._mode is None and head:
            if head.startswith(("{", self.TAG)):
                self._mode = "json"
            elif not self.TAG.startswith(head):
                self._mode = "text"
                out, self._buffer = self._buffer, ""
                return self._content(out), []
        return "", []

    def finish(self) -> tuple[str, list[ToolCall]]:
        text, self._buffer = self._buffer, ""
        if self._mode == "json":
            calls = self._calls(text.strip().removeprefix(self.TAG))
            if calls:
                return "", calls
        return self._content(text) + self._flush(), []

    @staticmethod
    def _calls(text: str) -> list[ToolCall]:
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(text):
            try:
                obj, end = decoder.raw_decode(text, at)
            except json.JSONDecodeError:
                return []
            call = _call_from(obj, "parameters")
            if call is None:
                return []
            calls.append(call)
            at = end
            while at < len(text) and text[at] in " \t\r\n;":
                at += 1
        return calls


def _decode_call(body: str, args_key: str) -> ToolCall | None:
    try:
        return _call_from(json.loads(body), args_key)
    except json.JSONDecodeError:
        return None


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


@dataclass(frozen=True)
class ToolFormat:
    """How one model family writes tool calls (see the module docstring)."""

    name: str
    parser: Callable[[ToolFormat], ToolCallParser]
    begin: Callable[[str], str]  # a call's text up to its arguments object, for a function name
    end: str  # after the arguments object
    separator: str  # between parallel calls
    markers: tuple[str, ...]  # strings that must survive detokenization (special tokens in some vocabularies)

    def new_parser(self) -> ToolCallParser:
        return self.parser(self)

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content or None, calls) of a whole message: what a stream of it adds up to."""
        parser = self.new_parser()
        content, calls = parser.feed(text)
        rest, more = parser.finish()
        content += rest
        return (content or None), calls + more

    def structural_tag(self, tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
        """xgrammar structural tag: one or more (one when not ``parallel``) calls of ``tools``
        (OpenAI function dicts) and nothing else, arguments valid for each one's parameters."""
        tags = [{"type": "tag", "begin": self.begin(t["name"]), "end": self.end,
                 "content": {"type": "json_schema", "json_schema": t.get("parameters") or {"type": "object"}}}
                for t in tools]
        return {"type": "structural_tag", "format": {"type": "tags_with_separator", "tags": tags,
                                                      "separator": self.separator, "at_least_one": True,
                                                      "stop_after_first": not parallel}}

    def render_calls(self, calls: list[dict[str, Any]]) -> str:
        """Earlier calls (OpenAI tool_calls, arguments decoded) as the model would have written them."""
        return self.separator.join(self.begin(c["function"]["name"]) + json.dumps(c["function"]["arguments"],
                                                                                   ensure_ascii=False) + self.end
                                   for c in calls)


def _json_name(name: str) -> str:
    return json.dumps(name, ensure_ascii=False)


HERMES = ToolFormat("hermes", _HermesParser, lambda n: '<tool_call>\n{"name": ' + _json_name(n) + ', "arguments": ',
                    "}\n</tool_call>", "\n", ("<tool_call>", "</tool_call>"))
LLAMA3_JSON = ToolFormat("llama3_json", _Llama3JsonParser,
                         lambda n: '{"name": ' + _json_name(n) + ', "parameters": ', "}", "; ", ("<|python_tag|>",))
TOOL_FORMATS = {f.name: f for f in (LLAMA3_JSON, HERMES)}


def template_text(tokenizer: Any) -> str:
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("tool_use") or template.get("default") or ""
    return template if isinstance(template, str) else ""


def template_takes_tools(template: str) -> bool:
    return "tools" in template


def tool_format_for(template: str) -> ToolFormat:
    """The registry: Llama 3.1's JSON form when the template writes it, else Hermes."""
    if "<|python_tag|>" in template or ('"parameters"' in template and "ipython" in template):
        return LLAMA3_JSON
    return HERMES


def forced_tool_constraint(fmt: ToolFormat, mode: str, tools: list[dict[str, Any]], parallel: bool
                           ) -> StructuredOutput | None:
    """The grammar of "required" (any of ``tools``) and named (its one function) tool choices."""
    if mode not in ("required", "named"):
        return None
    return StructuredOutput("structural_tag", json.dumps(fmt.structural_tag(tools, parallel and mode == "required"),
                                                         ensure_ascii=False))


def prepare_conversation(conversation: list[dict[str, Any]], tools: list[dict[str, Any]], template: str
                         ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(conversation, extra chat-template arguments). A template that takes tools gets them as
    ``tools`` (OpenAI's shape) and renders calls and results itself; for one that does not,
    the tools go into the system prompt in the Hermes format, earlier calls are written as the
    model would have written them and tool results become ``<tool_response>`` user turns."""
    if template_takes_tools(template):
        return conversation, ({"tools": [{"type": "function", "function": t} for t in tools]} if tools else {})
    out: list[dict[str, Any]] = []
    for m in conversation:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        elif m.get("tool_calls"):
            calls = HERMES.render_calls(m["tool_calls"])
            out.append({"role": m["role"], "content": f"{m['content']}\n{calls}" if m["content"] else calls})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    if tools:
        system = HERMES_SYSTEM.format(tools="\n".join(json.dumps({"type": "function", "function": t},
                                                                 ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{system}"}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out, {}


def markers_are_special(tokenizer: Any, fmt: ToolFormat) -> bool:
    """True when one of the format's markers is a special token (skip_special_tokens would drop it)."""
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    return any(m in special for m in fmt.markers)
