"""Chat-template rendering: a conversation becomes the base model's prompt text (run by the replica, which
holds the tokenizer); a template that refuses the conversation is a 400.

Tools (`madapt.serve.openai.tools`) are rendered by the template when it renders them (it reads `tools`),
with assistant `tool_calls` and `tool` messages as transformers passes them. A template that does not
(SmolLM2's, a base model's plain rendering) gets them in madapt's own words instead: a system message that
lists the functions and asks for Hermes-style `<tool_call>{"name", "arguments"}</tool_call>` answers, past
calls written that way in the assistant's turns, and tool results as user turns in `<tool_response>` tags.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from madapt.serve.openai.errors import ProtocolError, shown
from madapt.serve.openai.tools import HERMES, LLAMA_JSON, PYTHON_TAG

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


TOOLS_PROMPT = (
    "You can call these functions (each with the JSON Schema of its arguments):\n{functions}\n"
    'To call one, answer with <tool_call>{{"name": <function name>, "arguments": <arguments object>}}</tool_call>'
    " (one such tag per call); otherwise answer as usual."
)
"""The system text that describes tools to a model whose chat template does not render them."""


def _template(tokenizer: PreTrainedTokenizerBase) -> str:
    return str(getattr(tokenizer, "chat_template", None) or "")


def renders_tools(tokenizer: PreTrainedTokenizerBase) -> bool:
    """Whether the tokenizer's chat template renders tools itself (it reads `tools`)."""
    return "tools" in _template(tokenizer)


def tool_format(tokenizer: PreTrainedTokenizerBase) -> str:
    """The format the model writes calls in (`tools.read_calls`): Llama 3.1's JSON when its template asks
    for it (`<|python_tag|>`, `"parameters"`), else Hermes tags (Qwen, Hermes, and madapt's own rendering)."""
    template = _template(tokenizer)
    llama = PYTHON_TAG in template or ('"parameters"' in template and "<tool_call>" not in template)
    return LLAMA_JSON if renders_tools(tokenizer) and llama else HERMES


def described(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """The conversation in madapt's words for a template that does not render tools (see the module)."""
    rendered = []
    for message in messages:
        if message.get("tool_calls"):
            calls = [
                {"name": c["function"]["name"], "arguments": c["function"]["arguments"]} for c in message["tool_calls"]
            ]
            tags = "".join(f"<tool_call>{json.dumps(call)}</tool_call>" for call in calls)
            rendered.append({"role": "assistant", "content": message["content"] + tags})
        elif message["role"] == "tool":
            rendered.append({"role": "user", "content": f"<tool_response>\n{message['content']}\n</tool_response>"})
        else:
            rendered.append(message)
    if tools:
        functions = "\n".join(json.dumps(tool["function"]) for tool in tools)
        text = TOOLS_PROMPT.format(functions=functions)
        if rendered[0]["role"] == "system":
            rendered[0] = rendered[0] | {"content": f"{rendered[0]['content']}\n\n{text}"}
        else:
            rendered.insert(0, {"role": "system", "content": text})
    return rendered


def _render(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
) -> str:
    from madapt.data import render_chat

    with_tools = tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if not with_tools:
        return render_chat(tokenizer, messages)
    if renders_tools(tokenizer):
        prompt = tokenizer.apply_chat_template(
            messages, tools=tools or None, tokenize=False, add_generation_prompt=True
        )
        return str(prompt)
    return render_chat(tokenizer, described(messages, tools))


def chat_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
) -> str:
    """The conversation (and its tools) rendered by the base model's chat template; a template that refuses
    it (a role it does not know, turns that do not alternate) is a 400 with the template's own message."""
    import jinja2

    try:
        return _render(tokenizer, messages, tools)
    except jinja2.TemplateError as error:  # what `raise_exception(...)` in a template raises
        raise ProtocolError(
            400, f"the chat template refused these messages: {error}", param="messages", code="invalid_chat_template"
        ) from None
    except (TypeError, ValueError, KeyError, IndexError) as error:  # a template that fails on this input
        raise ProtocolError(
            400,
            f"the chat template could not render these messages: {type(error).__name__}: {shown(str(error), 200)}",
            param="messages",
            code="invalid_chat_template",
        ) from None
