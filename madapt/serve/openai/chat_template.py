"""Chat-template rendering: a conversation becomes the base model's prompt text (run by the replica, which
holds the tokenizer); a template that refuses the conversation is a 400."""

from __future__ import annotations

from typing import TYPE_CHECKING

from madapt.serve.openai.errors import ProtocolError, shown

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> str:
    """The conversation rendered by the base model's chat template; a template that refuses it (a role
    it does not know, turns that do not alternate) is a 400 with the template's own message."""
    import jinja2

    from madapt.data import render_chat

    try:
        return render_chat(tokenizer, messages)
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
