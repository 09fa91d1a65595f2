"""Seam: the OpenAI endpoints' request handler. Checks the request's policy before SGLang
logs or converts the request.

AROUND hook on OpenAIServingBase.handle_request (chat and completions inherit it). SGLang
logs the raw OpenAI request there (--log-requests-level >= 2) before anything else runs,
and answers every ValueError raised inside it with HTTP 400. So the hook resolves
`custom_params.tokenwise_safety` first and puts the effective policy, which carries no
override key, on the request: no log line, dump or later error can show the key, and a
refused policy is answered here with its own status (403 when it loosens the operator's
policy, 400 when malformed), streaming requests included. The tokenizer seam
(meta_info.around_generate) finds a policy.Resolved and leaves it alone.
"""
from __future__ import annotations

from tokenwise_safety.policy import POLICY_KEY, PolicyError, resolve

from .server_args import ATTR

HANDLE_REQUEST = "sglang.srt.entrypoints.openai.serving_base.OpenAIServingBase.handle_request"


def around_handle_request(original, serving, request, *args, **kwargs):
    config = getattr(serving.tokenizer_manager.server_args, ATTR, None)
    custom = getattr(request, "custom_params", None)
    if config is not None and isinstance(custom, dict) and custom.get(POLICY_KEY) is not None:
        try:
            effective = resolve(custom[POLICY_KEY], config)
        except PolicyError as e:
            return _answer(serving.create_error_response(
                str(e), err_type="Forbidden" if e.status_code == 403 else "BadRequestError",
                status_code=e.status_code))
        request.custom_params = {**custom, POLICY_KEY: effective}
    return original(serving, request, *args, **kwargs)


async def _answer(response):
    return response
