"""Training-step time of lycotrain's text adapters against PEFT's implementation of the same method.

Model: a random Llama with hidden 512, 4 layers, 8 heads (4 KV heads), vocab 1024; batch 4 x 64 tokens, fp32,
AdamW, one CPU thread. Both sides of a pair start from the same weights and see the same batch; each round runs every
setup once and the median of the per-round means is reported, so background load hits all of them alike.

    python benchmarks/text_step.py [--rounds 5] [--steps 10] [--out benchmarks/results/text_step.md]

Targets (issue 5): AdaLoRA <= 1.05x our LoRA; Llama-Adapter and X-LoRA no slower than PEFT's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

from lycotrain.text.adapter_set import attach_adalora, attach_llama_adapter, attach_lora, attach_xlora  # noqa: E402

BATCH, LENGTH, VOCAB = 4, 64, 1024
METHODS = ("lora", "adalora", "llama_adapter", "xlora")
ADALORA = dict(init_r=8, target_r=4, tinit=5, tfinal=5, delta_t=1)


def base_model(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=256,
                         tie_word_embeddings=False, use_cache=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.requires_grad_(False)
    return model


class Runner:
    """One training setup: forward + loss + backward + optimizer step + per-step hook."""

    def __init__(self, forward: Callable[..., Any], params: list[torch.nn.Parameter],
                 extra: Callable[[], torch.Tensor | None] = lambda: None,
                 after: Callable[[int], Any] = lambda step: None, train: Callable[[], Any] = lambda: None) -> None:
        self.forward, self.params, self.extra, self.after = forward, params, extra, after
        train()
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)
        self.step_index = 0

    def step(self, batch: torch.Tensor) -> None:
        loss = self.forward(input_ids=batch, labels=batch).loss
        extra = self.extra()
        (loss if extra is None else loss + extra).backward()
        self.optimizer.step()
        self.step_index += 1
        self.after(self.step_index)
        self.optimizer.zero_grad(set_to_none=True)

    def time(self, batch: torch.Tensor, steps: int) -> float:
        start = time.perf_counter()
        for _ in range(steps):
            self.step(batch)
        return (time.perf_counter() - start) / steps * 1000


def ours(method: str, experts: list[Path], total: int) -> Runner:
    model = base_model()
    if method == "lora":
        s = attach_lora(model, rank=8, alpha=16)
    elif method == "adalora":
        s = attach_adalora(model, alpha=16, total_step=total, **ADALORA)
    elif method == "llama_adapter":
        s = attach_llama_adapter(model, adapter_len=10, adapter_layers=4)
    else:
        s = attach_xlora(model, experts=experts, classifier_dropout=0.0)
    return Runner(s.runner, s.trainable_parameters(), s.extra_loss, s.after_optimizer_step, lambda: s.train(True))


def peft(method: str, experts: list[Path], total: int) -> Runner:
    from peft import AdaLoraConfig, AdaptionPromptConfig, LoraConfig, XLoraConfig, get_peft_model

    model = base_model()
    if method == "lora":
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    elif method == "adalora":
        config = AdaLoraConfig(lora_alpha=16, target_modules=["q_proj", "v_proj"], total_step=total,
                               deltaT=ADALORA["delta_t"], task_type="CAUSAL_LM",
                               **{k: v for k, v in ADALORA.items() if k != "delta_t"})
    elif method == "llama_adapter":
        config = AdaptionPromptConfig(adapter_len=10, adapter_layers=4, task_type="CAUSAL_LM")
    else:
        config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=512, xlora_depth=1, xlora_dropout_p=0.0,
                             adapters={str(i): str(p) for i, p in enumerate(experts)})
    peft_model = get_peft_model(model, config)
    after = (lambda step: peft_model.base_model.update_and_allocate(step)) if method == "adalora" else (lambda s: None)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    return Runner(peft_model, params, after=after, train=peft_model.train)


def make_experts(folder: Path) -> list[Path]:
    paths = []
    for index in range(2):
        torch.manual_seed(index + 1)
        lora = attach_lora(base_model(), rank=8, alpha=16)
        for module in lora.modules.values():
            torch.nn.init.normal_(module.lora_up.weight, std=0.02)
        paths.append(lora.save(folder / f"expert{index}"))
    return paths


def measure(rounds: int, steps: int) -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)
    batch = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    total = rounds * steps + 3 + 100  # the AdaLoRA schedule stays in its budgeting phase while timed
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        experts = make_experts(Path(tmp))
        runners = {(method, side): build(method, experts, total) for method in METHODS
                   for side, build in (("lycotrain", ours), ("peft", peft))}
        for runner in runners.values():
            runner.time(batch, 3)  # warm-up
        samples: dict[tuple[str, str], list[float]] = {key: [] for key in runners}
        for _ in range(rounds):  # every runner once per round: load changes hit all of them alike
            for key, runner in runners.items():
                samples[key].append(runner.time(batch, steps))
        for method in METHODS:
            results[method] = {side: statistics.median(samples[(method, side)]) for side in ("lycotrain", "peft")}
            print(f"{method:14s} lycotrain {results[method]['lycotrain']:7.1f} ms   peft "
                  f"{results[method]['peft']:7.1f} ms", file=sys.stderr)
    return results


def report(results: dict[str, dict[str, float]], rounds: int, steps: int) -> str:
    lora = results["lora"]["lycotrain"]
    lines = ["# Text adapters: training-step time, lycotrain vs PEFT", "",
             f"Random Llama (hidden 512, 4 layers, 8 heads / 4 KV heads, vocab {VOCAB}), batch {BATCH} x {LENGTH} "
             f"tokens, fp32, AdamW, 1 CPU thread; median of {rounds} rounds x {steps} steps (every setup once per round, so load changes hit all alike).",
             "LoRA r8 and AdaLoRA (init_r 8 -> target_r 4, allocator every step, orth-reg) on q_proj,v_proj; "
             "Llama-Adapter L=10 in all 4 layers; X-LoRA over 2 LoRA r8 experts (q,v), classifier depth 1.", "",
             "| method | lycotrain ms/step | PEFT ms/step | lycotrain / PEFT | lycotrain / our LoRA |",
             "|---|---|---|---|---|"]
    for method, r in results.items():
        lines.append(f"| {method} | {r['lycotrain']:.1f} | {r['peft']:.1f} | {r['lycotrain'] / r['peft']:.2f} | "
                     f"{r['lycotrain'] / lora:.2f} |")
    ada = results["adalora"]["lycotrain"] / lora
    checks = [("AdaLoRA <= 1.05x our LoRA", ada <= 1.05, f"{ada:.2f}x")]
    for method in ("llama_adapter", "xlora"):
        ratio = results[method]["lycotrain"] / results[method]["peft"]
        checks.append((f"{method} no slower than PEFT", ratio <= 1.0, f"{ratio:.2f}x"))
    lines += ["", "| target | met | measured |", "|---|---|---|"]
    lines += [f"| {name} | {'yes' if ok else 'NO'} | {value} |" for name, ok, value in checks]
    lines += ["", "Rerun: `python benchmarks/text_step.py`", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "text_step.md"))
    args = parser.parse_args()
    results = measure(args.rounds, args.steps)
    text = report(results, args.rounds, args.steps)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text, encoding="utf-8")
    Path(args.out).with_suffix(".json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
