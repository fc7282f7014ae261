"""X-LoRA: experts frozen, scalings sum to 1 under softmax, top-k zeroes the rest, the mixed layer equals the
per-expert formula (and PEFT's X-LoRA forward, in train mode with the experts' own lora_dropout too), only the
classifier trains, save -> reload is identical."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from text_helpers import load_model, token_batch

from lycotrain.adapters.xlora import expert_scalings, mixed_lora, top_k_scalings
from lycotrain.errors import AdapterError, FormatError
from lycotrain.text.adapter_set import attach_lora, attach_xlora, load_adapter


def _experts(tmp_path, n: int = 2, targets=(["q_proj", "v_proj"], ["v_proj", "o_proj"]), dropouts=(0.0,)) -> list:
    folders = []
    for index in range(n):
        torch.manual_seed(index + 1)
        model = load_model()
        lora = attach_lora(model, target_modules=targets[index % len(targets)], rank=4, alpha=8,
                           dropout=dropouts[index % len(dropouts)])
        for module in lora.modules.values():
            torch.nn.init.normal_(module.lora_up.weight, std=0.2)
        folders.append(lora.save(tmp_path / f"expert{index}"))
    return folders


def test_scalings_softmax_and_top_k():
    logits = torch.randn(2, 5, 3)
    scalings = expert_scalings(logits, n_layers=4, n_experts=3, layerwise=False, temperature=0.5)
    assert scalings.shape == (2, 5, 4, 3)
    torch.testing.assert_close(scalings.sum(-1), torch.ones(2, 5, 4))
    top = top_k_scalings(scalings, k=1)
    assert torch.all((top != 0).sum(-1) == 1)
    assert torch.equal(top.max(-1).values, scalings.max(-1).values)
    renormalised = top_k_scalings(scalings, k=2, softmax_top_k=True)
    assert torch.all((renormalised != 0).sum(-1) == 2)
    torch.testing.assert_close(renormalised.sum(-1), torch.ones(2, 5, 4))


def test_mixed_lora_equals_per_expert_sum():
    x = torch.randn(2, 5, 16)
    a = [torch.randn(4, 16), torch.randn(2, 16)]
    b = [torch.randn(24, 4), torch.randn(24, 2)]
    scales = [2.0, 0.5]
    s = torch.softmax(torch.randn(2, 5, 2), -1)
    expected = sum((x * s[..., e:e + 1]) @ a[e].T @ b[e].T * scales[e] for e in range(2))
    got = mixed_lora(x, torch.cat(a), torch.cat(b, dim=1), torch.tensor([2.0] * 4 + [0.5] * 2),
                     torch.tensor([0] * 4 + [1] * 2), s)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)


def test_mixed_lora_with_expert_dropout_equals_per_expert_formula_with_the_same_masks():
    x = torch.randn(2, 5, 16)
    a = [torch.randn(4, 16), torch.randn(2, 16), torch.randn(3, 16)]
    b = [torch.randn(24, 4), torch.randn(24, 2), torch.randn(24, 3)]
    scales, dropouts = [2.0, 0.5, 1.0], [0.3, 0.0, 0.6]
    s = torch.softmax(torch.randn(2, 5, 3), -1)
    torch.manual_seed(3)  # PEFT's order: one mask per expert with p > 0, drawn on x * s_e
    expected = sum(F.dropout(x * s[..., e:e + 1], dropouts[e]) @ a[e].T @ b[e].T * scales[e] for e in range(3))
    after_expected = torch.get_rng_state()
    torch.manual_seed(3)
    got = mixed_lora(x, torch.cat(a), torch.cat(b, dim=1), torch.tensor([2.0] * 4 + [0.5] * 2 + [1.0] * 3),
                     torch.tensor([0] * 4 + [1] * 2 + [2] * 3), s, expert_ranks=[4, 2, 3], expert_dropout=dropouts)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-5)
    assert torch.equal(torch.get_rng_state(), after_expected)  # the same random numbers, no more
    no_dropout = sum((x * s[..., e:e + 1]) @ a[e].T @ b[e].T * scales[e] for e in range(3))
    assert not torch.allclose(got, no_dropout, atol=1e-2)


def _peft_xlora(folders: list, **settings):
    from peft import XLoraConfig, get_peft_model

    base = load_model()
    base.config.use_cache = False
    config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size,
                         adapters={str(i): str(f) for i, f in enumerate(folders)}, **settings)
    return get_peft_model(base, config)


def test_expert_dropout_in_train_mode_matches_peft_xlora_seeded(tmp_path):
    """Each expert's lora_dropout acts in training like PEFT's: same seed -> same logits (same masks, drawn in
    the same order, the classifier's dropout in between); in eval mode no dropout and no random numbers."""
    folders = _experts(tmp_path, n=3, dropouts=(0.3, 0.0, 0.15))
    theirs = _peft_xlora(folders, xlora_depth=2, xlora_size=16, xlora_dropout_p=0.2)
    adapters = attach_xlora(load_model(), experts=folders, depth=2, size=16, classifier_dropout=0.2)
    assert adapters.xlora.classifier.load_state_dict(theirs.base_model.internal_xlora_classifier.state_dict(),
                                                     strict=False).unexpected_keys == []
    ids = token_batch()

    def seeded(run) -> torch.Tensor:
        torch.manual_seed(11)
        with torch.no_grad():
            return run(input_ids=ids).logits

    theirs.train()  # the tiny llama has no dropout of its own: only the experts and the classifier draw
    adapters.train(True)
    ours_train = seeded(adapters.runner)
    torch.testing.assert_close(ours_train, seeded(theirs), atol=1e-5, rtol=0)
    theirs.eval()
    adapters.train(False)
    rng = torch.get_rng_state()
    ours_eval = seeded(adapters.runner)
    torch.testing.assert_close(ours_eval, seeded(theirs), atol=1e-5, rtol=0)
    torch.manual_seed(0)
    with torch.no_grad():
        adapters.runner(input_ids=ids)
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(0).get_state())  # eval draws nothing
    torch.set_rng_state(rng)
    assert not torch.allclose(ours_train, ours_eval, atol=1e-3)  # the dropout really acted


def test_shared_matmul_unless_training_with_expert_dropout(tmp_path, monkeypatch):
    """The concatenated lora_A runs as one matmul per layer in eval mode and when every expert's p is 0; the
    per-expert path only in training with some p > 0."""
    used: list[int] = []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, *rest: used.append(id(w)) or linear(x, w, *rest))

    def shared_matmuls(adapters, train: bool) -> list[int]:
        adapters.train(train)
        used.clear()
        adapters.runner(input_ids=token_batch()).logits.sum().backward()
        return [used.count(id(m.lora_A)) for m in adapters.modules.values()]

    plain = attach_xlora(load_model(), experts=_experts(tmp_path / "plain"), classifier_dropout=0.0)
    dropped = attach_xlora(load_model(), experts=_experts(tmp_path / "dropped", dropouts=(0.0, 0.25)))
    assert not any(m.drops_experts for m in plain.modules.values())
    assert shared_matmuls(plain, train=True) == [1] * len(plain.modules)
    assert shared_matmuls(dropped, train=False) == [1] * len(dropped.modules)
    with_dropout = [any(p > 0 for p in m.expert_dropout) for m in dropped.modules.values()]
    assert 0 < sum(with_dropout) < len(with_dropout)  # q_proj has only the p = 0 expert: it keeps the shared path
    assert shared_matmuls(dropped, train=True) == [0 if d else 1 for d in with_dropout]
    torch.manual_seed(0)
    with torch.no_grad():
        plain.runner(input_ids=token_batch())
    assert torch.equal(torch.get_rng_state(), torch.manual_seed(0).get_state())  # no expert dropout drawn


def test_matches_peft_xlora_forward(tmp_path):
    from peft import XLoraConfig, get_peft_model

    folders = _experts(tmp_path)
    base = load_model()
    base.config.use_cache = False
    config = XLoraConfig(task_type="CAUSAL_LM", hidden_size=base.config.hidden_size, xlora_depth=1,
                         adapters={str(i): str(f) for i, f in enumerate(folders)})
    theirs = get_peft_model(base, config).eval()
    model = load_model()
    ours = attach_xlora(model, experts=folders)
    classifier = theirs.base_model.internal_xlora_classifier
    ours.xlora.classifier.load_state_dict(classifier.state_dict(), strict=False)
    assert ours.xlora.classifier.n_layers == classifier.n_layers
    ids = token_batch()
    with torch.no_grad():
        torch.testing.assert_close(ours.runner(ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


def test_experts_frozen_only_classifier_trains(tmp_path):
    model = load_model()
    adapters = attach_xlora(model, experts=_experts(tmp_path), layerwise=True, depth=2, size=16,
                            classifier_dropout=0.0)
    adapters.train()
    experts_before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW(adapters.trainable_parameters(), lr=1e-2)
    ids = token_batch()
    for _ in range(3):
        adapters.runner(ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in experts_before.items())
    assert not any(p.requires_grad for p in model.parameters())
    scalings = adapters.xlora.latest_scalings
    assert scalings.shape == (2, 12, len(adapters.modules), 2)
    torch.testing.assert_close(scalings.sum(-1), torch.ones(scalings.shape[:-1]))


def test_save_reload_identical_with_relative_expert_paths(tmp_path):
    model = load_model()
    adapters = attach_xlora(model, experts=_experts(tmp_path, dropouts=(0.1, 0.0)), top_k=1)
    torch.nn.init.normal_(adapters.xlora.classifier.layers[0].weight)
    adapters.train(False)
    ids = token_batch()
    with torch.no_grad():
        before = adapters.runner(ids).logits
    saved = adapters.save(tmp_path / "run" / "adapter")
    config = json.loads((saved / "adapter_config.json").read_text())
    assert config["adapters"] == {"0": "experts/0", "1": "experts/1"}
    moved = tmp_path / "moved"
    saved.rename(moved)  # the folder is self-contained: experts travel with it
    for index in range(2):
        (tmp_path / f"expert{index}" / "adapter_config.json").unlink()
    reloaded = load_adapter(load_model(), moved)
    assert [m.expert_dropout for m in reloaded.modules.values()] == [
        m.expert_dropout for m in adapters.modules.values()]  # the experts' lora_dropout travels with them
    assert {p for m in reloaded.modules.values() for p in m.expert_dropout} == {0.1, 0.0}
    reloaded.train(False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.runner(ids).logits, before, atol=0, rtol=0)


def test_needs_two_lora_experts(tmp_path):
    folders = _experts(tmp_path, n=1)
    with pytest.raises(AdapterError, match="two or more"):
        attach_xlora(load_model(), experts=folders)
    with pytest.raises(FormatError, match="adapter_config.json"):
        attach_xlora(load_model(), experts=[folders[0], tmp_path / "nothing"])
    config = json.loads((folders[0] / "adapter_config.json").read_text())
    (folders[0] / "adapter_config.json").write_text(json.dumps({**config, "lora_dropout": 1.5}))
    with pytest.raises(FormatError, match=re.escape(f"{folders[0]}: lora_dropout = 1.5")):
        attach_xlora(load_model(), experts=[folders[0], folders[0]])


def test_config_depth_builds_a_deeper_classifier_that_trains_and_reloads(tmp_path):
    from lycotrain.engine.config import Config
    from lycotrain.text.task import build_adapters

    config = Config.from_dict({"task": "text", "network": {"method": "xlora", "experts": [
        str(f) for f in _experts(tmp_path)], "xlora_depth": 2, "xlora_size": 16}})
    adapters = build_adapters(load_model(), config)
    linears = [m for m in adapters.xlora.classifier.layers if isinstance(m, torch.nn.Linear)]
    assert [tuple(m.weight.shape) for m in linears] == [(16, load_model().config.hidden_size), (2, 16)]
    adapters.train()
    optimizer = torch.optim.AdamW(adapters.trainable_parameters(), lr=1e-2)
    ids = token_batch()
    adapters.runner(ids, labels=ids).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in adapters.trainable_parameters())
    optimizer.step()
    adapters.train(False)
    with torch.no_grad():
        before = adapters.runner(ids).logits
    saved = adapters.save(tmp_path / "adapter")
    saved_config = json.loads((saved / "adapter_config.json").read_text())
    assert (saved_config["xlora_depth"], saved_config["xlora_size"]) == (2, 16)
    reloaded = load_adapter(load_model(), saved)
    reloaded.train(False)
    with torch.no_grad():
        torch.testing.assert_close(reloaded.runner(ids).logits, before, atol=0, rtol=0)


@pytest.mark.parametrize("dropout", [0.0, 0.35])
def test_config_classifier_dropout_is_built_saved_and_reloaded(tmp_path, dropout):
    from lycotrain.engine.config import Config
    from lycotrain.text.task import build_adapters

    experts = [str(f) for f in _experts(tmp_path)]
    network = {"method": "xlora", "experts": experts, "xlora_depth": 3, "xlora_size": 8}
    assert Config.from_dict({"task": "text", "network": network}).network.xlora_dropout == 0.2  # PEFT's default
    config = Config.from_dict({"task": "text", "network": {**network, "xlora_dropout": dropout}})
    adapters = build_adapters(load_model(), config)

    def dropouts(classifier) -> list[float]:
        return [m.p for m in classifier.layers if isinstance(m, torch.nn.Dropout)]

    assert dropouts(adapters.xlora.classifier) == ([dropout] * 2 if dropout else [])
    saved = adapters.save(tmp_path / "adapter")
    assert json.loads((saved / "adapter_config.json").read_text())["xlora_dropout_p"] == dropout
    reloaded = load_adapter(load_model(), saved)  # the layer indices (layers.0, layers.3 ...) depend on it too
    assert dropouts(reloaded.xlora.classifier) == dropouts(adapters.xlora.classifier)
    assert reloaded.settings["classifier_dropout"] == dropout


def test_a_saved_folder_with_a_bad_classifier_dropout_is_refused(tmp_path):
    adapters = attach_xlora(load_model(), experts=_experts(tmp_path))
    saved = adapters.save(tmp_path / "adapter")
    config = json.loads((saved / "adapter_config.json").read_text())
    (saved / "adapter_config.json").write_text(json.dumps({**config, "xlora_dropout_p": 1.0}))
    with pytest.raises(FormatError, match="xlora_dropout_p = 1.0 in adapter_config.json") as refused:
        load_adapter(load_model(), saved)
    assert str(saved) in str(refused.value)  # the message names the folder, as every refused file does


@pytest.mark.parametrize("field, value", [("xlora_depth", 0), ("xlora_size", 0), ("xlora_dropout", 1.0),
                                          ("xlora_dropout", -0.1)])
def test_config_rejects_a_bad_classifier_setting(field, value):
    from lycotrain.engine.config import Config
    from lycotrain.errors import ConfigError

    with pytest.raises(ConfigError, match=f"network.{field}"):
        Config.from_dict({"task": "text", "network": {"method": "xlora", "experts": ["a", "b"], field: value}})
