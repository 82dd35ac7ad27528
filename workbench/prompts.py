"""Checks on a prompt's text that need no tokenizer, so a command can run them before torch is imported."""

from __future__ import annotations

from workbench.errors import InputError


def check_prompt_text(prompt: str) -> str:
    """The prompt, if it is text; bytes that were not UTF-8 (which Python keeps as lone surrogates) are refused."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InputError(f"the prompt is not valid UTF-8 text (at character {error.start}); "
                         "give it in UTF-8") from None
    return prompt
