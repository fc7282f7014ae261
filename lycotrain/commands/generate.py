"""``lycotrain generate --model DIR --adapter DIR --prompt TEXT [--max-new-tokens N]``: greedy continuation."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="local transformers causal-LM folder or builtin:tiny-llama")
    parser.add_argument("--adapter", help="adapter folder (PEFT LoRA / AdaLoRA / adaption prompt, or lycotrain "
                                          "X-LoRA); a run folder means its adapter/ sub-folder")
    parser.add_argument("--prompt", required=True, action="append",
                        help="prompt text, framed like the training data (repeat for several)")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens (default 64)")


def run(args: argparse.Namespace) -> int:
    from lycotrain.text.adapter_set import load_adapter, resolve_adapter_folder
    from lycotrain.text.generate import generate_text
    from lycotrain.text.models import load_causal_lm

    model, tokenizer = load_causal_lm(args.model)
    runner = model
    if args.adapter:
        runner = load_adapter(model, resolve_adapter_folder(args.adapter)).runner
    for prompt in args.prompt:
        print(generate_text(runner, tokenizer, prompt, args.max_new_tokens))
    return 0
