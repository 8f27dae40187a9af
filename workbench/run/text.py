"""Incremental detokenization: the text each new token adds, without decoding the whole output every step."""

from __future__ import annotations


class IncrementalText:
    """Text pieces of a growing token list. Decodes only a short window of recent tokens (the previous piece's
    tokens as context, so a tokenizer's joining rules see their neighbours) and holds back a piece that ends in a
    partial multi-byte character until the token that completes it arrives."""

    def __init__(self, decode):
        self.decode = decode  # ids -> text
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window
        self.read = 0  # tokens already turned into text

    def add(self, token_id: int, final: bool = False) -> str:
        self.ids.append(token_id)
        before = self.decode(self.ids[self.prefix:self.read])
        after = self.decode(self.ids[self.prefix:])
        if (after.endswith("\ufffd") and not final) or len(after) <= len(before) and not final:
            return ""  # wait for more bytes (or a token that adds no text yet)
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]
