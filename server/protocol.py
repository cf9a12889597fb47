"""OpenAI request bodies (pydantic v2) and their translation into SamplingParams.

Unknown extra fields are ignored, as OpenAI clients send fields that come and go. Fields Kiln
does not implement (tools, response_format other than text, logit_bias, ...) are rejected
with a 400 naming them, never silently ignored: ``check_supported`` is the one place that
decides.
"""

from __future__ import annotations

from typing import Any, Mapping, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kiln.scheduler.sampling_params import SamplingParams, SamplingParamsError
from kiln.server.errors import bad_request


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # Some clients send `"temperature": null` for "not set"; treat it as absent.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(_Body):
    include_usage: bool = False


class ContentPart(_Body):
    type: str
    text: str | None = None


class ChatMessage(_Body):
    role: str
    content: Union[str, list[ContentPart], None] = None
    name: str | None = None


class _SamplingFields(_Body):
    """Fields shared by chat and completions requests."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    n: int = 1
    stop: Union[str, list[str], None] = None
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    user: str | None = None
    logit_bias: dict[str, float] | None = None

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
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
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
        """Messages as plain dicts for the chat template; text parts are joined."""
        out = []
        for i, m in enumerate(self.messages):
            content = m.content
            if isinstance(content, list):
                if any(p.type != "text" for p in content):
                    raise bad_request("Only text content parts are supported.", f"messages[{i}].content")
                content = "".join(p.text or "" for p in content)
            msg: dict[str, Any] = {"role": m.role, "content": content or ""}
            if m.name:
                msg["name"] = m.name
            out.append(msg)
        return out


PromptField = Union[str, list[int], list[Union[str, list[int]]]]


class CompletionRequest(_SamplingFields):
    prompt: PromptField
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        self._check_common()
        if self.echo:
            raise bad_request("echo is not supported by this server.", "echo")
        if self.suffix:
            raise bad_request("suffix is not supported by this server.", "suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_request("best_of other than n is not supported by this server.", "best_of")

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts (text or token ids)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt must not be empty.", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # one prompt of token ids
        return list(p)

    def to_sampling_params(self, max_tokens: int, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        try:
            return self._sampling_params(max_tokens, self.logprobs, defaults)
        except SamplingParamsError as e:
            raise bad_request(str(e), e.param) from None


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int] = Field(default_factory=list)

