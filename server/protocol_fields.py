"""Building blocks of the OpenAI request bodies (server/protocol.py): strict scalar types, the
base model, and the nested objects apps send for structured output and tool calling.

``response_format`` follows OpenAI (``text``, ``json_object``, ``json_schema``); the
vLLM-style extras ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar``
(EBNF) are plain request fields (server/structured.py turns them into one constraint).
"""

from __future__ import annotations

from typing import Annotated, Any, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, model_validator

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # strict floats still take JSON integers
Bool = Annotated[bool, Strict()]


class Body(BaseModel):
    """Unknown fields are ignored; ``null`` means "not sent"."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # Some clients send `"temperature": null` for "not set"; treat it as absent.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class JsonSchemaParam(Body):
    name: str | None = None
    description: str | None = None
    schema_: Union[dict[str, Any], Bool, None] = Field(default=None, alias="schema")
    strict: Bool | None = None


class ResponseFormat(Body):
    type: str
    json_schema: JsonSchemaParam | None = None


class FunctionDef(Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: Bool | None = None


class ToolParam(Body):
    type: str = "function"
    function: FunctionDef


class FunctionName(Body):
    name: str


class NamedToolChoice(Body):
    type: str = "function"
    function: FunctionName


class FunctionCallParam(Body):
    name: str
    arguments: Union[str, dict[str, Any]] = "{}"  # JSON text in OpenAI's API; an object is taken too


class ToolCallParam(Body):
    id: str | None = None
    type: str = "function"
    function: FunctionCallParam
