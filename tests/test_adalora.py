"""AdaLoRA: forward and regulariser equal PEFT's; the rank allocator is bit-compatible with PEFT's
RankAllocator (same budgets, same masks, same E) over a whole schedule; pruned ranks stay zero."""

from __future__ import annotations

import pytest
import torch
from text_helpers import load_model, token_batch

from lycotrain.adapters.adalora import AdaLoRAAdapter, RankAllocator, budget_schedule, orthogonal_regularizer
from lycotrain.errors import AdapterError
from lycotrain.text.adapter_set import attach_adalora

SCHEDULE = dict(init_r=6, target_r=2, tinit=2, tfinal=3, total_step=12)


def test_budget_schedule_matches_the_observed_peft_schedule():
    # specs/peft-methods.md §1.4: init_r=6, target_r=2, 4 modules, tinit=2, tfinal=3, T=12
    budgets = [budget_schedule(step, init_budget=24, target_budget=8, tinit=2, tfinal=3, total_step=12,
                               delta_t=1)[0] for step in range(12)]
    assert budgets == [24, 24, 24, 18, 13, 10, 9, 8, 8, 8, 8, 8]


def test_zero_init_and_peft_forward():
    from peft.tuners.adalora.layer import SVDLinear
    from peft import AdaLoraConfig

    base = torch.nn.Linear(16, 24)
    ours = AdaLoRAAdapter(base, rank=6, alpha=8)
    x = torch.randn(3, 16)
    torch.testing.assert_close(ours(x), base(x), atol=0, rtol=0)
    torch.nn.init.normal_(ours.lora_E)
    theirs = SVDLinear(torch.nn.Linear(16, 24), "default", r=6, lora_alpha=8,
                       config=AdaLoraConfig(total_step=10, init_r=6))
    theirs.base_layer.load_state_dict(base.state_dict())
    for name in ("lora_A", "lora_E", "lora_B"):
        getattr(theirs, name)["default"].data.copy_(getattr(ours, name))
    torch.testing.assert_close(ours(x), theirs(x), atol=1e-6, rtol=0)
    torch.testing.assert_close(base(x) + x @ ours.delta_weight().T, ours(x), atol=1e-6, rtol=0)


def _peft_and_ours():
    from peft import AdaLoraConfig, get_peft_model

    peft_model = get_peft_model(load_model(), AdaLoraConfig(target_modules=["q_proj", "v_proj"], lora_alpha=8,
                                                            deltaT=1, task_type="CAUSAL_LM", **SCHEDULE))
    peft_model.train()
    ours_model = load_model()
    ours = attach_adalora(ours_model, target_modules=["q_proj", "v_proj"], alpha=8, **SCHEDULE)
    layers = {n.removeprefix("base_model.model."): m for n, m in peft_model.named_modules() if hasattr(m, "lora_E")}
    with torch.no_grad():
        for path, adapter in ours.modules.items():
            for name in ("lora_A", "lora_E", "lora_B"):
                getattr(adapter, name).copy_(getattr(layers[path], name)["default"])
    return peft_model, layers, ours


def test_regularizer_equals_peft():
    peft_model, _, ours = _peft_and_ours()
    ids = token_batch()
    with torch.no_grad():
        with_reg = peft_model(input_ids=ids, labels=ids).loss
        plain = peft_model.base_model.model(input_ids=ids, labels=ids).loss
    expected = with_reg - plain
    torch.testing.assert_close(ours.extra_loss(), expected, atol=1e-6, rtol=0)


def test_allocator_is_bit_compatible_with_peft():
    """Both allocators see identical parameters and gradients at every step (PEFT's, after its optimizer step);
    budgets, rank patterns and the masked E must be identical bit for bit."""
    peft_model, layers, ours = _peft_and_ours()
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch()
    for step in range(SCHEDULE["total_step"]):
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        with torch.no_grad():
            for path, adapter in ours.modules.items():
                for name in ("lora_A", "lora_E", "lora_B"):
                    theirs = getattr(layers[path], name)["default"]
                    getattr(adapter, name).copy_(theirs)
                    getattr(adapter, name).grad = theirs.grad.clone()
        peft_model.base_model.update_and_allocate(step)
        budget = ours.after_optimizer_step(step)
        allocator = peft_model.base_model.rankallocator
        assert budget == allocator.budget_schedule(step)[0] or step >= SCHEDULE["total_step"] - SCHEDULE["tfinal"]
        for path, adapter in ours.modules.items():
            assert torch.equal(adapter.lora_E, layers[path].lora_E["default"]), f"step {step}: {path}"
        optimizer.zero_grad()
    peft_pattern = {k.removesuffix(".lora_E.default"): v for k, v in
                    peft_model.peft_config["default"].rank_pattern.items()}
    assert ours.rank_pattern() == peft_pattern
    assert sum(map(sum, peft_pattern.values())) == SCHEDULE["target_r"] * len(peft_pattern)


def test_budget_reaches_target_on_schedule_and_pruned_ranks_stay_zero():
    model = load_model()
    ours = attach_adalora(model, target_modules=["q_proj", "v_proj"], alpha=8, **SCHEDULE)
    optimizer = torch.optim.AdamW(ours.trainable_parameters(), lr=1e-2)
    ids = token_batch()
    final_start = SCHEDULE["total_step"] - SCHEDULE["tfinal"]
    for step in range(1, SCHEDULE["total_step"] + 1):
        (model(ids, labels=ids).loss + ours.extra_loss()).backward()
        optimizer.step()
        budget = ours.after_optimizer_step(step)
        optimizer.zero_grad()
        kept = sum(int((a.lora_E != 0).sum()) for a in ours.modules.values())
        if step <= SCHEDULE["tinit"]:
            assert budget == 24 and ours.rank_pattern() is None
        if step >= final_start:
            assert budget == SCHEDULE["target_r"] * len(ours.modules) == kept
            for path, adapter in ours.modules.items():  # pruned singular values never come back
                pruned = ~torch.tensor(ours.rank_pattern()[path])
                assert torch.all(adapter.lora_E[pruned] == 0)


def test_allocator_needs_gradients_and_a_budgeting_phase():
    adapter = AdaLoRAAdapter(torch.nn.Linear(8, 8), rank=4)
    with pytest.raises(AdapterError, match="tinit"):
        RankAllocator({"m": adapter}, target_r=2, total_step=10, tinit=8, tfinal=2)
    with pytest.raises(AdapterError, match="target_r"):
        RankAllocator({"m": adapter}, target_r=4, total_step=10, tfinal=2)
    with pytest.raises(AdapterError, match="gradient"):
        RankAllocator({"m": adapter}, target_r=2, total_step=10).step(1)


def test_orthogonal_regularizer_is_zero_for_orthonormal_factors():
    adapter = AdaLoRAAdapter(torch.nn.Linear(8, 8), rank=4)
    q, _ = torch.linalg.qr(torch.randn(8, 8))
    with torch.no_grad():
        adapter.lora_A.copy_(q[:4])
        adapter.lora_B.copy_(q[:, :4])
    assert orthogonal_regularizer([adapter]).item() < 1e-5
