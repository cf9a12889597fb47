"""Token-level stop rules, checked by the scheduler after each appended output token.

Stop *strings* need text and are checked by the engine loop after detokenizing.
"""

from __future__ import annotations

from kiln.scheduler.request import Request, RequestStatus

STOPPED = RequestStatus.FINISHED_STOPPED
LENGTH = RequestStatus.FINISHED_LENGTH


def check_stop(request: Request, token: int, max_model_len: int) -> tuple[RequestStatus, int | None] | None:
    """Whether ``token``, just appended to the request's outputs, ends it.

    In order: a stop token id (stop_reason = the id) or EOS (unless ignore_eos; stop_reason
    None), both only once ``min_tokens`` tokens precede this one (min_tokens counts the
    tokens generated before a stop token may appear); then max_tokens; then max_model_len.
    Returns (finished status, stop_reason) or None to go on.
    """
    params = request.sampling_params
    num_outputs = len(request.output_token_ids)
    if num_outputs > params.min_tokens:
        if params.stop_token_ids and token in params.stop_token_ids:
            return STOPPED, token
        if not params.ignore_eos and token in request.eos_token_ids:
            return STOPPED, None
    if reaches_length_limit(request, num_outputs, max_model_len):
        return LENGTH, None
    return None


def reaches_length_limit(request: Request, num_outputs: int, max_model_len: int) -> bool:
    """Whether ``num_outputs`` output tokens end the request by length: its max_tokens, or
    prompt + outputs filling max_model_len."""
    return num_outputs >= request.max_tokens or request.num_prompt_tokens + num_outputs >= max_model_len
