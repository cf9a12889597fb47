"""OpenAI-shaped errors: one exception type the handlers raise, and the app's error handlers.

Every error a client sees has the body ``{"error": {"message", "type", "param", "code"}}``.
FastAPI's default 422 for validation failures becomes a 400 naming the offending field;
anything unexpected becomes a 500 that reveals nothing internal (the traceback is logged).
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    413: "invalid_request_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error to report to the client with an HTTP status, in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(status, HTTPStatus(status).phrase.lower().replace(" ", "_")),
            "param": param,
            "code": code,
        }
    }


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def internal_error() -> APIError:
    return APIError(500, "The server failed to generate this response; see the server log.")


# Parts of a pydantic error location that name a union member or a type, not a field.
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "bytes", "none", "dict", "list"})


def _field_path(loc: list[Any]) -> str:
    """``messages[0].content`` from ("messages", 0, "content", "str", ...): the fields up to the
    first union-member label (a type name, or one with brackets such as "list[int]")."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part.isidentifier() and part not in _TYPE_NAMES and not part[0].isupper():
            path += f".{part}" if path else part
        else:
            break
    return path


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One line naming the first bad field, from pydantic's error list."""
    errors = exc.errors()
    if not errors:
        return "Invalid request body.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return f"Malformed JSON body: {first.get('ctx', {}).get('error', 'cannot parse')}", None
    if first.get("type") == "lone_surrogate":  # raised on the whole body; it names its own field
        return first.get("msg", "invalid text"), first["ctx"]["param"]
    # loc is ("body", "field", ...) for body fields; drop the leading "body".
    loc = [p for p in first.get("loc", ()) if p != "body"]
    msg = first.get("msg", "invalid value")
    if not loc:
        if first.get("type") == "missing":
            return "The request body is missing.", None
        return f"Invalid request body: {msg}", None
    path = _field_path(loc) or str(loc[0])
    return f"Invalid value for '{path}': {msg}", path


def install_error_handlers(app: FastAPI) -> None:
    """Route every error through the OpenAI error shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(400, message, param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code
        message = str(exc.detail) if exc.detail else HTTPStatus(status).phrase
        if status == 404:
            message = f"Route {request.url.path} not found."
        return JSONResponse(error_body(status, message), status_code=status, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("Unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse(internal_error().body(), status_code=500)
