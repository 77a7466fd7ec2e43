"""The router's tokenizer as `/tokenize` and the chat routes use it: tokens with offsets, and chat prompts."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from tokenizers import Tokenizer

from router.chat_template import ChatTemplate, TemplateError, load_chat_template
from router.schemas import SimpleToken


@dataclass(frozen=True)
class ModelTokenizer:
    tokenizer: Tokenizer
    chat_template: ChatTemplate | None = None

    @classmethod
    def load(cls, tokenizer: Tokenizer, name: str, revision: str | None = None) -> ModelTokenizer:
        """`tokenizer` as loaded by the router, plus the chat template found beside it (see chat_template)."""
        return cls(tokenizer, load_chat_template(name, revision))

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[SimpleToken]:
        encoding = await asyncio.to_thread(self.tokenizer.encode, text, add_special_tokens=add_special_tokens)
        return [
            SimpleToken(id=token_id, text=token, start=start, stop=stop)
            for token_id, token, (start, stop) in zip(encoding.ids, encoding.tokens, encoding.offsets)
        ]

    @property
    def template(self) -> ChatTemplate:
        if self.chat_template is None:
            raise TemplateError("this model has no chat template")
        return self.chat_template

    @property
    def template_uses_tools(self) -> bool:
        return self.template.uses_tools

    def chat_prompt(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """The rendered prompt, without a leading BOS when the tokenizer adds one itself (no doubled BOS)."""
        prompt = self.template.render(messages, tools)
        bos = self.template.bos_token
        if bos and prompt.startswith(bos) and self._adds(bos):
            return prompt[len(bos):]
        return prompt

    def _adds(self, token: str) -> bool:
        token_id = self.tokenizer.token_to_id(token)
        return token_id is not None and token_id in self.tokenizer.encode("", add_special_tokens=True).ids
