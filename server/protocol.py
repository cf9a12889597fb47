"""OpenAI request bodies (pydantic v2) and their translation into SamplingParams.

Unknown extra fields are ignored, as OpenAI clients send fields that come and go. Fields Kiln
does not implement (tools, response_format other than text, logit_bias, ...) are rejected
with a 400 naming them, never silently ignored: ``check_supported`` is the one place that
decides. Types are strict, as OpenAI's are: ``true`` is not an integer, ``"42"`` is not a
seed, ``1`` is not a boolean. Text holding a lone UTF-16 surrogate (``"\ud800"``), which no
tokenizer or JSON encoder accepts, is refused before any field is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Mapping, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator
from pydantic_core import PydanticCustomError

from kiln.scheduler.sampling_params import SamplingParams, SamplingParamsError
from kiln.server.errors import bad_request

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # strict floats still take JSON integers
Bool = Annotated[bool, Strict()]

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")


@dataclass(frozen=True)
class RequestLimits:
    """Per-request caps set by the server's configuration (and the model's vocabulary)."""

    max_n: int
    max_prompts: int
    vocab_size: int


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # Some clients send `"temperature": null` for "not set"; treat it as absent.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class _Request(_Body):
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


class StreamOptions(_Body):
    include_usage: Bool = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
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
    """Messages as plain dicts for the chat template; text parts are joined."""
    out = []
    for i, m in enumerate(messages):
        msg: dict[str, Any] = {"role": m.role, "content": m.text(i)}
        if m.name:
            msg["name"] = m.name
        out.append(msg)
    return out


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

    def check_limits(self, limits: RequestLimits) -> None:
        """The server's caps: n, and stop ids inside the vocabulary."""
        if self.n > limits.max_n:
            raise bad_request(f"n must be at most {limits.max_n} on this server, got {self.n}.", "n")
        bad = [t for t in self.stop_token_ids or [] if not 0 <= t < limits.vocab_size]
        if bad:
            raise bad_request(f"stop_token_ids holds {bad[0]}, outside the vocabulary [0, {limits.vocab_size}).",
                              "stop_token_ids")

    def _check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed when stream is true.", "stream_options")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported by this server.", "logit_bias")

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
                         defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        value = lambda name: self.sampling_value(name, defaults)  # noqa: E731
        return SamplingParams(
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
        )


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: Int | None = None
    logprobs: Bool = False
    top_logprobs: Int | None = None
    add_generation_prompt: Bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Union[str, dict[str, Any], None] = None
    functions: list[dict[str, Any]] | None = None
    function_call: Union[str, dict[str, Any], None] = None
    response_format: dict[str, Any] | None = None

    def check_supported(self) -> None:
        self._check_common()
        if self.tools:
            raise bad_request("tools (function calling) are not supported by this server.", "tools")
        if self.tool_choice not in (None, "none"):
            raise bad_request("tool_choice other than 'none' is not supported by this server.", "tool_choice")
        if self.functions or self.function_call not in (None, "none"):
            raise bad_request("functions / function_call are not supported by this server.", "functions")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise bad_request("response_format other than 'text' is not supported by this server.", "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs requires logprobs to be true.", "top_logprobs")
        if not self.messages:
            raise bad_request("messages must not be empty.", "messages")
        check_template_kwargs(self.chat_template_kwargs)

    @property
    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The max tokens asked for and the field name that asked (for error messages)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def to_sampling_params(self, max_tokens: int, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        try:
            return self._sampling_params(max_tokens, logprobs, defaults)
        except SamplingParamsError as e:
            param = {"logprobs": "top_logprobs", "max_tokens": self.requested_max_tokens[1]}.get(e.param, e.param)
            raise bad_request(str(e), param) from None

    def conversation(self) -> list[dict[str, Any]]:
        return conversation(self.messages)


# Keys a request may not pass to the chat template: its own template (arbitrary Jinja, whose
# cost the server cannot bound) and features this server does not implement.
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
        if self.echo:
            raise bad_request("echo is not supported by this server.", "echo")
        if self.suffix:
            raise bad_request("suffix is not supported by this server.", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of other than n is not supported by this server.", "best_of")

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

    def to_sampling_params(self, max_tokens: int, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        try:
            return self._sampling_params(max_tokens, self.logprobs, defaults)
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

