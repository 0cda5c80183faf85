"""Tokenizer of a checkpoint directory: `tokenizer.json` through the `tokenizers` library, and the chat
template (`tokenizer_config.json`'s `chat_template` or `chat_template.jinja`) rendered with jinja2."""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer as _HFTokenizer


def _token_text(value) -> str | None:
    """tokenizer_config.json gives special tokens as strings or as {"content": ...} dicts."""
    return value.get("content") if isinstance(value, dict) else value


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, chat_template: str | None = None, eos_token: str | None = None,
                 bos_token: str | None = None):
        self.backend = tokenizer
        self.chat_template = chat_template
        self.eos_token, self.bos_token = eos_token, bos_token

    @classmethod
    def from_pretrained(cls, directory) -> "Tokenizer":
        directory = os.fspath(directory)
        file = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"no tokenizer.json in {directory!r}")
        settings = {}
        config_file = os.path.join(directory, "tokenizer_config.json")
        if os.path.isfile(config_file):
            with open(config_file) as f:
                settings = json.load(f)
        template = settings.get("chat_template")
        template_file = os.path.join(directory, "chat_template.jinja")
        if template is None and os.path.isfile(template_file):
            with open(template_file) as f:
                template = f.read()
        return cls(_HFTokenizer.from_file(file), template, _token_text(settings.get("eos_token")),
                   _token_text(settings.get("bos_token")))

    @staticmethod
    def exists(directory) -> bool:
        return os.path.isfile(os.path.join(os.fspath(directory), "tokenizer.json"))

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self.token_to_id(self.eos_token)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the checkpoint's chat template."""
        if not self.chat_template:
            raise ValueError("this tokenizer has no chat template (tokenizer_config.json 'chat_template' or chat_template.jinja)")
        from jinja2.exceptions import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False, indent=indent)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            eos_token=self.eos_token or "", bos_token=self.bos_token or "",
        )


class TextStreamer:
    """Prints generated text as it arrives (row 0), holding back an incomplete UTF-8 sequence."""

    def __init__(self, tokenizer: Tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def __call__(self, tokens) -> None:
        self.ids.append(int(tokens[0]))
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)
