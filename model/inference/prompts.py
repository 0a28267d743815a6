"""Prompt text -> token ids: plain prompts, and chat messages rendered with the tokenizer's template.

In chat messages only the template writes control tokens (``encode_chat``): a ``<|im_start|>``
typed by a user is encoded as the characters it is, so nobody can forge a system turn.
"""
from __future__ import annotations

import re

from model.errors import EngineInputError


def encode_prompt(tokenizer, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids for ``prompt`` (rendered with the chat template when ``chat``)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise EngineInputError("the prompt is empty: type some text")
    if chat:
        if getattr(tokenizer, "chat_template", None) is None:
            raise EngineInputError("this tokenizer has no chat template: turn the chat option off")
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return encode_chat(tokenizer, messages)
    return tokenizer(prompt).input_ids


def encode_chat(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> list[int]:
    """Token ids of ``messages`` rendered with the chat template, where only the template makes control
    tokens: a ``<|im_start|>`` typed inside a message is encoded as the plain text it is.

    The template is rendered around a placeholder per message. As the tokenizer itself does, the text
    is cut at the template's special tokens and each piece between them (template text plus message
    text) is tokenized on its own, here with ``split_special_tokens`` so that nothing in a message is
    read as a control token. For ordinary text the ids equal tokenizing the rendered string (tested)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise EngineInputError("this tokenizer has no chat template: turn the chat option off")
    marks = [f"\u0000msg{i}\u0000" for i in range(len(messages))]
    rendered = tokenizer.apply_chat_template([{**m, "content": mark} for m, mark in zip(messages, marks)],
                                             tokenize=False, add_generation_prompt=add_generation_prompt)
    template, rest = [], rendered
    for mark in marks:
        before, found, rest = rest.partition(mark)
        if not found:  # a template that rewrites contents: render for real, control tokens removed from the text
            return _encode_chat_stripped(tokenizer, messages, add_generation_prompt)
        template.append(before)
    template.append(rest)
    specials = sorted(tokenizer.all_special_tokens, key=len, reverse=True)
    cut = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")")
    ids: list[int] = []
    segment = ""
    for i, part in enumerate(template):
        for j, piece in enumerate(cut.split(part)):
            if j % 2:  # a control token written by the template
                if segment:
                    ids += tokenizer(segment, add_special_tokens=False, split_special_tokens=True).input_ids
                segment = ""
                ids.append(tokenizer.convert_tokens_to_ids(piece))
            else:
                segment += piece
        if i < len(messages):
            segment += messages[i]["content"]
    if segment:
        ids += tokenizer(segment, add_special_tokens=False, split_special_tokens=True).input_ids
    return ids


def _encode_chat_stripped(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> list[int]:
    """Fallback of ``encode_chat``: the special-token strings are deleted from the messages' text."""
    def strip(text: str) -> str:
        for special in tokenizer.all_special_tokens:
            text = text.replace(special, "")
        return text

    text = tokenizer.apply_chat_template([{**m, "content": strip(m["content"])} for m in messages], tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    return tokenizer(text, add_special_tokens=False).input_ids
