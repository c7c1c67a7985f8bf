"""Contexts as the model reads them: student and teacher messages, rendered with the chat template.

The student sees the prompt only; the teacher sees the prompt plus the demonstration inside a teacher
template (paper Sec. 3; the templates are ``names.TEACHER_TEMPLATES``). Both are one user turn after an
optional system message, tokenised the way the chat template renders them; a template with ``{turn}``
markers is a conversation instead (user, assistant, user, ...: the demonstration as an earlier answer).
"""

from __future__ import annotations

from sdft_cli.names import PLACEHOLDER, TURN


def fill_template(template: str, prompt: str, demonstration: str, context: str = "") -> str:
    """Substitute in one pass, so braces inside prompts (JSON, code) are left alone."""
    values = {"prompt": prompt, "demonstration": demonstration, "context": context}
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


def student_messages(prompt: str, system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]


def teacher_messages(
    prompt: str, demonstration: str, template: str, system: str | None, context: str | None = None
) -> list[dict]:
    turns = [fill_template(t, prompt, demonstration, context or "") for t in template.split(TURN)]
    head = [{"role": "system", "content": system}] if system else []
    return head + [{"role": ("user", "assistant")[i % 2], "content": t} for i, t in enumerate(turns)]


def encode_messages(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a chat context ending with the assistant generation prompt."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:  # base models without a chat template: plain text, one block per message
        text = "\n\n".join(m["content"] for m in messages) + "\n"
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def left_truncate(ids: list[int], limit: int | None) -> list[int]:
    """The last ``limit`` tokens (all of them when ``limit`` is None), as TRL and the official SDFT code
    truncate prompts (``prompt_ids[:, -max_prompt_length:]``)."""
    return ids if limit is None or len(ids) <= limit else ids[-limit:]


def encode_target(tokenizer, messages: list[dict], demonstration: str, eos_ids: list[int]) -> list[int]:
    """The demonstration as the assistant's turn, as the chat template renders it, up to its end-of-turn.

    Rendering the whole conversation (not ``demonstration + eos``) trains the ending the template really
    produces, e.g. Gemma's ``<end_of_turn>`` rather than its tokenizer's ``<eos>``.
    """
    prompt = encode_messages(tokenizer, messages)
    if getattr(tokenizer, "chat_template", None):
        turn = [*messages, {"role": "assistant", "content": demonstration}]
        text = tokenizer.apply_chat_template(turn, tokenize=False)
        full = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if full[: len(prompt)] == prompt:
            target = full[len(prompt) :]
            end = next((i for i, t in enumerate(target) if t in eos_ids), None)
            if end is not None:
                return target[: end + 1]
    return list(tokenizer(demonstration, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
