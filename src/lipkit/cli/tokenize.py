"""``lipkit tokenize``: show how a model's tokenizer splits text."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tokenize",
        help="tokenize text with a model's tokenizer",
        description="Print the token ids (and, for the CLIP tokenizer, the tokens) of each text.",
    )
    p.add_argument("texts", nargs="+", help="texts to tokenize")
    p.add_argument("--model", default="ViT-B-32", help="model config whose tokenizer to use (default: ViT-B-32)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lipkit.models import get_tokenizer
    from lipkit.models.text_inputs import TextTokens

    tokens = get_tokenizer(args.model)(args.texts)
    ids = tokens.ids if isinstance(tokens, TextTokens) else tokens  # Hugging Face: ids with an attention mask
    for text, row in zip(args.texts, ids.tolist()):
        used = [i for i in row if i != 0]
        print(f"{text!r}: {len(used)} tokens")
        print("  ids:", used)
    return 0
