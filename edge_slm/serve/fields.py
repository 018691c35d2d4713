"""Which request fields the server reads, and which it refuses: a field of OpenAI's API that the
server does not implement is a 400 naming it, never silence (a client that asked for audio, a
stored completion or a reasoning effort must learn it did not get one). Fields outside OpenAI's
API are ignored, as OpenAI ignores them, except llama.cpp's sampling names, which are honoured.

OpenAI's chat-completions and (legacy) completions request bodies, as of its API reference:
every field is in one of the sets below."""

from __future__ import annotations

from edge_slm.serve.requests import ApiError

# Honoured by both routes (the sampling fields, with OpenAI's ranges: requests.sampling).
COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "logit_bias",
    "presence_penalty",
    "frequency_penalty",
    "user",  # an end-user id for abuse monitoring: accepted, nothing to do with it here
}
CHAT = COMMON | {
    "messages",
    "max_completion_tokens",
    "logprobs",  # true/false, with top_logprobs 0-20
    "top_logprobs",
    "chat_template_kwargs",  # vLLM's and llama.cpp's extra template variables
    # serve.tools' (structured output and tool calls)
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
}
COMPLETIONS = COMMON | {"prompt", "logprobs", "echo", "suffix", "best_of"}  # logprobs: an integer 0-5 here
# llama.cpp server's names, honoured on both routes.
LLAMA_CPP = {"top_k", "min_p", "repetition_penalty", "repeat_penalty", "cache_prompt"}

# OpenAI's fields this server does not implement, and what each would have asked for.
UNIMPLEMENTED_CHAT = {
    "audio": "audio output",
    "modalities": "output modalities other than text",
    "prediction": "predicted outputs",
    "web_search_options": "web search",
    "service_tier": "service tiers",
    "store": "stored completions",
    "metadata": "stored completions' metadata",
    "reasoning_effort": "a reasoning effort",
    "verbosity": "a verbosity level",
    "functions": "the deprecated functions (send tools)",
    "function_call": "the deprecated function_call (send tool_choice)",
    "prompt_cache_key": "OpenAI's prompt cache (this server reuses prefixes itself; cache_prompt: false turns it off)",
    "prompt_cache_retention": "OpenAI's prompt cache retention",
    "safety_identifier": "safety identifiers",
}

# Values that ask for nothing beyond what the server does: a client library may send these.
_HARMLESS = {"store": (False,), "service_tier": ("auto", "default"), "modalities": (["text"],)}


def refuse_unimplemented(body: dict, chat: bool) -> None:
    """400 naming the first field of OpenAI's API that this route does not implement (unless its
    value asks for nothing: null, false, an empty list or object, or the field's default)."""
    for name, what in UNIMPLEMENTED_CHAT.items():
        value = body.get(name)
        if value is None or value is False or value in ([], {}) or value in _HARMLESS.get(name, ()):
            continue
        raise ApiError(
            400, f"'{name}' is not supported by this server ({what}); leave it out", name, "unsupported_parameter"
        )
    if not chat:
        for name in ("tools", "tool_choice", "messages"):  # response_format: tools.py honours it here too
            if body.get(name) is not None:
                raise ApiError(
                    400,
                    f"'{name}' is a chat-completions field; send it to /v1/chat/completions",
                    name,
                    "unsupported_parameter",
                )
