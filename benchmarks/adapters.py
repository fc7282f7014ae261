"""Adapter training-step benchmark: lycotrain vs peft vs lycoris-lora, and against the frozen-model floor.

    python benchmarks/adapters.py [--quick] [--json PATH]

For each method (lora, loha, lokr, oft, hra) and implementation, one forward + backward + AdamW step of a
diffusers UNet with adapters on the attention + MLP layers of its transformer blocks (kohya's default target
set: every Linear and 1x1 conv inside them). Each case runs in its own process (forked from a parent that
built the model once, so every case starts from the same weights): one warm-up step, then the median of a few
timed steps (CPU time of the process, which a busy machine disturbs less than wall time). The cases run
round-robin for several rounds and each keeps its best median, so a noisy moment hits one round, not a method.
The floor is the frozen model, forward + backward to the input. Saved-activation memory is the sum of the
unique storages that autograd saves during one step, parameters excluded (``saved_tensors_hooks``).

Models: (a) a small SD-style UNet with block_out_channels (128, 256, 512) at batch 2 x 4 x 32 x 32 latents;
(b) the SD1.5-size UNet at 32 x 32 latents. ``--quick`` runs (a) only, at 16 x 16 latents, one round, in
about a minute on an idle 2-core machine: a smoke run whose ratios are noisier (few tokens, one round); the
full run is the reference. Results: ``--json`` records, and a markdown table of ratios in ``benchmarks/results/``.
Compare ratios, never absolute times (CPU, one thread).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

RESULTS = Path(__file__).resolve().parent / "results"

# Method settings at (close to) equal trainable parameters: LoHa r8 has as many parameters as LoRA r16.
OURS = {"lora": {"rank": 16, "alpha": 16}, "loha": {"rank": 8, "alpha": 8}, "lokr": {"rank": 16, "alpha": 16},
        "oft": {"block_size": 16}, "hra": {"rank": 8}}
# the targets of issue 2, as ratios to peft LoRA's step
TARGETS = {"lora": 1.00, "loha": 1.05, "lokr": 1.05, "oft": 1.00, "hra": 1.10}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    config: dict[str, Any]
    batch: int
    latent: int
    context: int  # text-encoder hidden size (cross_attention_dim)
    steps: int
    rounds: int


SMALL = dict(block_out_channels=(128, 256, 512), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
             "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
             layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
SD15 = dict(block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=768,
            attention_head_dim=8)


def model_specs(quick: bool) -> list[ModelSpec]:
    if quick:
        return [ModelSpec("unet-128-256-512 (16x16)", SMALL, batch=2, latent=16, context=768, steps=3, rounds=1)]
    return [ModelSpec("unet-128-256-512", SMALL, batch=2, latent=32, context=768, steps=3, rounds=2),
            ModelSpec("sd15-unet", SD15, batch=1, latent=32, context=768, steps=2, rounds=2)]


def target_paths(unet: nn.Module) -> list[str]:
    """The attn-mlp set: every Linear and 1x1 conv inside a transformer (``attentions.N``) block."""
    return [name for name, m in unet.named_modules() if ".attentions." in name
            and (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1)))]


# ---- attaching each implementation ------------------------------------------------------------------
def attach_ours(unet: nn.Module, method: str, names: list[str]) -> list[nn.Parameter]:
    try:
        from lycotrain.inject import inject
    except ImportError:  # injection not there yet: wrap the same layers directly
        from lycotrain.adapters import build_adapter
        params: list[nn.Parameter] = []
        for name in names:
            parent, _, attr = name.rpartition(".")
            adapter = build_adapter(method, unet.get_submodule(name), **OURS[method])
            setattr(unet.get_submodule(parent), attr, adapter)
            params += adapter.adapter_parameters()
        return params
    adapters = inject(unet, prefix="lora_unet", method=method, params=OURS[method], preset="attn-mlp")
    if len(adapters) != len(names):
        raise RuntimeError(f"inject targeted {len(adapters)} layers, the benchmark's attn-mlp set has {len(names)}")
    return adapters.parameters()


def attach_peft(unet: nn.Module, method: str, names: list[str]) -> list[nn.Parameter]:
    import peft

    configs: dict[str, Callable[[], Any]] = {
        "lora": lambda: peft.LoraConfig(r=16, lora_alpha=16, target_modules=names),
        "loha": lambda: peft.LoHaConfig(r=8, alpha=8, target_modules=names),
        "lokr": lambda: peft.LoKrConfig(r=16, alpha=16, target_modules=names),
        "oft": lambda: peft.OFTConfig(r=0, oft_block_size=16, target_modules=names),
        "hra": lambda: peft.HRAConfig(r=8, target_modules=names),
    }
    peft.inject_adapter_in_model(configs[method](), unet)
    return [p for p in unet.parameters() if p.requires_grad]


def attach_lycoris(unet: nn.Module, method: str, names: list[str]) -> list[nn.Parameter]:
    """One LyCORIS module per target layer (what ``LycorisNetwork`` builds), each in its faster mode."""
    from lycoris.modules.diag_oft import DiagOFTModule
    from lycoris.modules.lokr import LokrModule
    from lycoris.modules.locon import LoConModule
    from lycoris.modules.loha import LohaModule

    builders: dict[str, Callable[[str, nn.Module], nn.Module]] = {
        "lora": lambda n, m: LoConModule(n, m, lora_dim=16, alpha=16, bypass_mode=True),
        "loha": lambda n, m: LohaModule(n, m, lora_dim=8, alpha=8),
        "lokr": lambda n, m: LokrModule(n, m, lora_dim=16, alpha=16, bypass_mode=True),
        "oft": lambda n, m: DiagOFTModule(n, m, lora_dim=16, bypass_mode=True),
    }
    holder = nn.ModuleList()
    for name in names:
        module = builders[method](name, unet.get_submodule(name))
        module.apply_to()
        holder.append(module)
    unet._lycoris_benchmark_modules = holder  # keep them alive (not registered as submodules of the UNet)
    return [p for p in holder.parameters() if p.requires_grad]


IMPLS: dict[str, Callable[[nn.Module, str, list[str]], list[nn.Parameter]]] = {
    "lycotrain": attach_ours, "peft": attach_peft, "lycoris": attach_lycoris}
LYCORIS_METHODS = {"lora", "loha", "lokr", "oft"}


# ---- one case, in a child process -------------------------------------------------------------------
def saved_mib(step: Callable[[], None], excluded: set[int]) -> float:
    """Unique storages autograd saves during ``step`` (parameters excluded), in MiB."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values()) / 2**20


def run_case(unet: nn.Module, spec: ModelSpec, method: str, impl: str) -> dict[str, Any]:
    torch.manual_seed(0)
    names = target_paths(unet)
    params = [] if method == "floor" else IMPLS[impl](unet, method, names)
    generator = torch.Generator().manual_seed(1)
    shape = (spec.batch, 4, spec.latent, spec.latent)
    sample = torch.randn(shape, generator=generator, requires_grad=method == "floor")
    context = torch.randn(spec.batch, 77, spec.context, generator=generator)
    timesteps = torch.tensor([100 + 300 * i for i in range(spec.batch)])
    target = torch.randn(shape, generator=generator)
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None

    def step() -> None:
        loss = F.mse_loss(unet(sample, timesteps, context).sample, target)
        loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    excluded = {p.untyped_storage().data_ptr() for p in [*unet.parameters(), *unet.buffers(), *params]}
    memory = saved_mib(step, excluded)  # the warm-up step
    times = []
    for _ in range(spec.steps):
        start = time.process_time()
        step()
        times.append(time.process_time() - start)
    return {"model": spec.name, "method": method, "impl": "lycotrain" if method == "floor" else impl,
            "trainable": sum(p.numel() for p in params), "step_ms": statistics.median(times) * 1e3,
            "saved_mib": memory}


def _child(conn: Any, unet: nn.Module, spec: ModelSpec, method: str, impl: str) -> None:
    torch.set_num_threads(1)
    try:
        conn.send(run_case(unet, spec, method, impl))
    except Exception as exc:  # reported as a skipped case, the run goes on
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    conn.close()


def run_isolated(unet: nn.Module, spec: ModelSpec, method: str, impl: str) -> dict[str, Any]:
    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, unet, spec, method, impl))
    proc.start()
    child.close()
    result = parent.recv() if parent.poll(3600) else {"error": "no result within an hour"}
    proc.join()
    return result


def build_unet(spec: ModelSpec) -> nn.Module:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=spec.latent, in_channels=4, out_channels=4, **spec.config)
    return unet.requires_grad_(False).train()


def cases() -> list[tuple[str, str]]:
    out = [("floor", "frozen")]
    for method in OURS:
        out += [(method, impl) for impl in IMPLS if impl != "lycoris" or method in LYCORIS_METHODS]
    return out


# ---- report -----------------------------------------------------------------------------------------
def markdown(records: list[dict[str, Any]], skipped: list[str], command: str) -> str:
    lines = [f"# Adapter step benchmark\n\n`{command}` — CPU, one thread, fp32; forward + backward + AdamW on "
             "the attn-mlp layers. Ratios are what to compare (absolute times depend on the machine).\n"]
    for model in dict.fromkeys(r["model"] for r in records):
        rows = [r for r in records if r["model"] == model]
        by = {(r["method"], r["impl"]): r for r in rows}
        peft_lora = by.get(("lora", "peft"))
        floor = by.get(("floor", "lycotrain"))
        lines += [f"\n## {model}\n", "| method | impl | trainable | step ms | / peft LoRA | / best oracle | "
                  "/ floor | saved MiB |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            oracles = [by[(r["method"], i)]["step_ms"] for i in ("peft", "lycoris") if (r["method"], i) in by]
            ratio = lambda ref: f"{r['step_ms'] / ref:.3f}" if ref else "—"  # noqa: E731
            lines.append(f"| {r['method']} | {r['impl']} | {r['trainable']:,} | {r['step_ms']:.0f} | "
                         f"{ratio(peft_lora and peft_lora['step_ms'])} | {ratio(min(oracles, default=None))} | "
                         f"{ratio(floor and floor['step_ms'])} | {r['saved_mib']:.1f} |")
        lines += ["\n| target | ours / peft LoRA | met | ours / faster oracle | met |", "|---|---:|:-:|---:|:-:|"]
        for method, limit in TARGETS.items():
            ours = by.get((method, "lycotrain"))
            if ours is None or peft_lora is None:
                continue
            vs_lora = ours["step_ms"] / peft_lora["step_ms"]
            oracles = [by[(method, i)]["step_ms"] for i in ("peft", "lycoris") if (method, i) in by]
            vs_oracle = ours["step_ms"] / min(oracles) if oracles else float("nan")
            lines.append(f"| {method} <= {limit:.2f} | {vs_lora:.3f} | {'yes' if vs_lora <= limit else 'NO'} | "
                         f"{vs_oracle:.3f} | {'yes' if vs_oracle <= 1.0 else 'NO'} |")
    if skipped:
        lines += ["\nSkipped: " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def preload(methods: list[str]) -> None:
    """Import every implementation once in the parent, so the forked cases do not each pay for it."""
    import importlib

    for name in ["peft", "lycoris.modules.locon", "lycoris.modules.loha", "lycoris.modules.lokr",
                 "lycoris.modules.diag_oft", "lycotrain.inject",
                 *[f"lycotrain.adapters.{m}" for m in methods]]:
        try:
            importlib.import_module(name)
        except ImportError:  # that implementation's cases report the error and are skipped
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small UNet at 16x16 latents only (~1 min)")
    parser.add_argument("--json", type=Path, help="write the records to this JSON file")
    parser.add_argument("--methods", nargs="*", default=list(OURS), help="subset of methods to run")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    preload(args.methods)
    records, skipped = [], []
    for spec in model_specs(args.quick):
        unet = build_unet(spec)
        todo = [(m, i) for m, i in cases() if m == "floor" or m in args.methods]
        best: dict[tuple[str, str], dict[str, Any]] = {}
        for round_index in range(spec.rounds):
            for method, impl in todo:
                if round_index and (method, impl) not in best:
                    continue  # failed in the first round
                result = run_isolated(unet, spec, method, impl)
                if "error" in result:
                    skipped.append(f"{spec.name} {method}/{impl}: {result['error']}")
                    print(f"skip {method}/{impl}: {result['error']}", file=sys.stderr)
                    continue
                print(f"{spec.name:28s} round {round_index + 1} {method:6s} {result['impl']:10s} "
                      f"{result['trainable']:>10,d} {result['step_ms']:9.1f} ms {result['saved_mib']:8.1f} MiB",
                      flush=True)
                kept = best.setdefault((method, impl), result)
                kept["step_ms"] = min(kept["step_ms"], result["step_ms"])
        records += list(best.values())
    command = "python benchmarks/adapters.py" + (" --quick" if args.quick else "")
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = RESULTS / ("adapters-quick.md" if args.quick else "adapters.md")
    report.write_text(markdown(records, sorted(set(skipped)), command))
    if args.json:
        args.json.write_text(json.dumps(records, indent=1))
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
