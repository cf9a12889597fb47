"""OpenAI request bodies (pydantic v2) and their translation into SamplingParams.

Unknown extra fields are ignored, as OpenAI clients send fields that come and go. Fields Kiln
does not implement (``functions``, ``best_of`` other than n, ...) are rejected with a 400
naming them, never silently ignored: ``check_supported`` is the one place that decides.
Types are strict, as OpenAI's are: ``true`` is not an integer, ``"42"`` is not a seed, ``1``
is not a boolean. Text holding a lone UTF-16 surrogate (``"\ud800"``), which no
tokenizer or JSON encoder accepts, is refused before any field is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Union

from pydantic import Field, model_validator
from pydantic_core import PydanticCustomError

from kiln.scheduler.sampling_params import SamplingParams, SamplingParamsError
from kiln.server.errors import bad_request
from kiln.server.protocol_fields import (Body, Bool, Float, Int, NamedToolChoice, ResponseFormat, ToolCallParam,
                                         ToolParam)

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


@dataclass(frozen=True)
class RequestLimits:
    """Per-request caps set by the server's configuration (and the model's vocabulary)."""

    max_n: int
    max_prompts: int
    vocab_size: int


class _Request(Body):
    """A top-level request body: its text is checked for lone surrogates before anything else."""

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, data: Any) -> Any:
        found = find_lone_surrogate(data)
        if found is not None:
            path, index = found
            raise PydanticCustomError(
                "lone_surrogate",
                "Invalid value for '{param}': it holds a lone UTF-16 surrogate at character {index}, "
                "which is not valid Unicode (surrogates come in pairs).",
                {"param": path, "index": index},
            )
        return data


def find_lone_surrogate(data: Any) -> tuple[str, int] | None:
    """(path such as ``messages[0].content``, character index) of the first string (or dict
    key) in ``data`` holding a lone surrogate; None if there is none. Iterative: the depth of
    the JSON cannot exhaust the stack."""
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        path, value = stack.pop()
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                return path, e.start
        elif isinstance(value, list):
            stack.extend((f"{path}[{i}]", v) for i, v in reversed(list(enumerate(value))))
        elif isinstance(value, dict):
            items = list(value.items())
            for key, v in reversed(items):
                key_path = f"{path}.{key}" if path else str(key)
                stack.append((key_path, v))
                stack.append((path or "body", key))  # a bad key is reported at its dict
    return None


class StreamOptions(Body):
    include_usage: Bool = False


class ContentPart(Body):
    type: str
    text: str | None = None


class ChatMessage(Body):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[ToolCallParam] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None

    def text(self, i: int) -> str:
        """The message's text (parts joined) after checking what OpenAI checks; ``i`` is its index."""
        if self.role not in CHAT_ROLES:
            raise bad_request(f"Unknown role {self.role!r}; expected one of {', '.join(CHAT_ROLES)}.",
                              f"messages[{i}].role")
        content = self.content
        if content is None:
            if self.role == "assistant" and (self.tool_calls or self.function_call):
                return ""
            raise bad_request(f"A {self.role} message needs 'content'.", f"messages[{i}].content")
        if isinstance(content, str):
            return content
        for j, part in enumerate(content):
            if part.type != "text":
                raise bad_request("Only text content parts are supported.", f"messages[{i}].content[{j}].type")
            if part.text is None:
                raise bad_request("A text content part needs 'text'.", f"messages[{i}].content[{j}].text")
        return "".join(p.text or "" for p in content)


def conversation(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages as plain dicts for the chat template; text parts are joined, tool call
    arguments decoded into objects (what chat templates expect)."""
    out = []
    for i, m in enumerate(messages):
        msg: dict[str, Any] = {"role": m.role, "content": m.text(i)}
        if m.name:
            msg["name"] = m.name
        if m.tool_call_id is not None:
            msg["tool_call_id"] = m.tool_call_id
        if m.tool_calls:
            msg["tool_calls"] = [_template_call(c, f"messages[{i}].tool_calls[{j}]") for j, c in enumerate(m.tool_calls)]
        out.append(msg)
    return out


def _template_call(call: ToolCallParam, param: str) -> dict[str, Any]:
    args = call.function.arguments
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            args = None
    if not isinstance(args, dict):
        raise bad_request("Tool call arguments must be a JSON object.", f"{param}.function.arguments")
    return {"id": call.id, "type": "function", "function": {"name": call.function.name, "arguments": args}}


def messages_size(messages: list[ChatMessage]) -> int:
    """Characters of text in the messages (decides which tokenizer lane renders them)."""
    size = 0
    for m in messages:
        if isinstance(m.content, str):
            size += len(m.content)
        elif m.content:
            size += sum(len(p.text or "") for p in m.content)
    return size


class _SamplingFields(_Request):
    """Fields shared by chat and completions requests."""

    model: str | None = None
    max_tokens: Int | None = None
    temperature: Float = 1.0
    top_p: Float = 1.0
    top_k: Int = 0
    min_p: Float = 0.0
    seed: Int | None = None
    presence_penalty: Float = 0.0
    frequency_penalty: Float = 0.0
    repetition_penalty: Float = 1.0
    n: Int = 1
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[Int] | None = None
    min_tokens: Int = 0
    ignore_eos: Bool = False
    stream: Bool = False
    stream_options: StreamOptions | None = None
    skip_special_tokens: Bool = True
    include_stop_str_in_output: Bool = False
    user: str | None = None
    logit_bias: dict[str, Float] | None = None
    response_format: ResponseFormat | None = None
    guided_json: Union[str, dict[str, Any], None] = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    prompt_logprobs: Int | None = None  # vLLM's extra: logprobs of the prompt tokens (top-K alternatives)

    def check_limits(self, limits: RequestLimits) -> None:
        """The server's caps: n, and stop ids and biased ids inside the vocabulary."""
        if self.n > limits.max_n:
            raise bad_request(f"n must be at most {limits.max_n} on this server, got {self.n}.", "n")
        bad = [t for t in self.stop_token_ids or [] if not 0 <= t < limits.vocab_size]
        if bad:
            raise bad_request(f"stop_token_ids holds {bad[0]}, outside the vocabulary [0, {limits.vocab_size}).",
                              "stop_token_ids")
        bad = [t for t in self.logit_bias_ids() or {} if not 0 <= t < limits.vocab_size]
        if bad:
            raise bad_request(f"logit_bias holds token {bad[0]}, outside the vocabulary [0, {limits.vocab_size}).",
                              "logit_bias")

    def logit_bias_ids(self) -> dict[int, float] | None:
        """logit_bias with its keys (token ids as JSON object keys) as integers."""
        if not self.logit_bias:
            return None
        out = {}
        for key, bias in self.logit_bias.items():
            if not key.isascii() or not key.strip().isdigit():
                raise bad_request(f"logit_bias keys must be token ids, got {key[:40]!r}.", "logit_bias")
            out[int(key)] = bias
        return out

    def _check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
        self.logit_bias_ids()

    @property
    def include_usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_value(self, name: str, defaults: Mapping[str, Any] | None) -> Any:
        """Field ``name`` as sent, else the server's default for it (generation_config.json),
        else the field's own default."""
        if name in self.model_fields_set or not defaults or name not in defaults:
            return getattr(self, name)
        return defaults[name]

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         defaults: Mapping[str, Any] | None = None, **extra: Any) -> SamplingParams:
        value = lambda name: self.sampling_value(name, defaults)  # noqa: E731
        fields: dict[str, Any] = dict(
            n=self.n,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            temperature=value("temperature"),
            top_p=value("top_p"),
            top_k=value("top_k"),
            min_p=value("min_p"),
            repetition_penalty=value("repetition_penalty"),
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=self.seed,
            stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens,
            logit_bias=self.logit_bias_ids(),
            prompt_logprobs=self.prompt_logprobs,
        )
        return SamplingParams(**{**fields, **extra})


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: Int | None = None
    logprobs: Bool = False
    top_logprobs: Int | None = None
    add_generation_prompt: Bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: Union[str, NamedToolChoice, None] = None
    parallel_tool_calls: Bool = True
    functions: list[dict[str, Any]] | None = None
    function_call: Union[str, dict[str, Any], None] = None

    def check_supported(self) -> None:
        self._check_common()
        if self.functions or self.function_call not in (None, "none"):
            raise bad_request("functions / function_call are deprecated and not supported: send tools.", "functions")
        self.tool_mode()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
        if not self.messages:
            raise bad_request("messages must not be empty.", "messages")
        check_template_kwargs(self.chat_template_kwargs)

    def tool_mode(self) -> tuple[str, list[dict[str, Any]]]:
        """("none" | "auto" | "required" | "named", the tools in play as OpenAI function dicts);
        a named choice leaves only its function. Checks tools and tool_choice."""
        tools = [t.function.model_dump(exclude_none=True) for t in self.tools or []]
        if any(t.type != "function" for t in self.tools or []):
            raise bad_request("Only tools of type 'function' are supported.", "tools")
        if len({t["name"] for t in tools}) != len(tools):
            raise bad_request("Tool function names must be unique.", "tools")
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if tools else "none")
        if isinstance(choice, NamedToolChoice):
            named = [t for t in tools if t["name"] == choice.function.name]
            if not named:
                raise bad_request(f"tool_choice names {choice.function.name!r}, which is not in tools.", "tool_choice")
            return "named", named
        if choice not in ("none", "auto", "required"):
            raise bad_request("tool_choice must be 'none', 'auto', 'required' or a named function.", "tool_choice")
        if choice != "none" and not tools:
            raise bad_request(f"tool_choice {choice!r} needs tools.", "tool_choice")
        return choice, ([] if choice == "none" else tools)

    @property
    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The max tokens asked for and the field name that asked (for error messages)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def to_sampling_params(self, max_tokens: int, defaults: Mapping[str, Any] | None = None,
                           **extra: Any) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        try:
            return self._sampling_params(max_tokens, logprobs, defaults, **extra)
        except SamplingParamsError as e:
            param = {"logprobs": "top_logprobs", "max_tokens": self.requested_max_tokens[1]}.get(e.param, e.param)
            raise bad_request(str(e), param) from None

    def conversation(self) -> list[dict[str, Any]]:
        return conversation(self.messages)


# Keys a request may not pass to the chat template: its own template (arbitrary Jinja, whose
# cost the server cannot bound), tools (the top-level field carries them) and documents.
_REFUSED_TEMPLATE_KWARGS = ("chat_template", "tools", "documents")


def check_template_kwargs(kwargs: dict[str, Any] | None) -> None:
    refused = [k for k in _REFUSED_TEMPLATE_KWARGS if k in (kwargs or {})]
    if refused:
        raise bad_request(f"chat_template_kwargs may not set {refused[0]!r}.", "chat_template_kwargs")


PromptField = Union[str, list[Int], list[Union[str, list[Int]]]]


class CompletionRequest(_SamplingFields):
    prompt: PromptField
    logprobs: Int | None = None
    echo: Bool = False
    suffix: str | None = None
    best_of: Int | None = None

    def check_supported(self) -> None:
        self._check_common()
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of other than n is not supported by this server.", "best_of")
        if self.suffix is not None and self.echo:
            raise bad_request("echo cannot be combined with suffix (fill-in-the-middle).", "echo")

    def prompts(self, limits: RequestLimits | None = None) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids), at most ``max_prompts``."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt must not be empty.", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one prompt of token ids
        if limits is not None and len(p) > limits.max_prompts:
            raise bad_request(f"prompt holds {len(p)} prompts; this server takes at most {limits.max_prompts} "
                              "per request.", "prompt")
        return list(p)

    def to_sampling_params(self, max_tokens: int, defaults: Mapping[str, Any] | None = None,
                           **extra: Any) -> SamplingParams:
        try:
            return self._sampling_params(max_tokens, self.logprobs, defaults, **extra)
        except SamplingParamsError as e:
            raise bad_request(str(e), e.param) from None


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: Bool = True
    add_generation_prompt: Bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[Int] = Field(default_factory=list)

