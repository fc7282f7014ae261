"""The text tab's methods and the job queue in a real browser, on the built-in tiny LM: a run queued behind a
running one starts after it, and Stop takes a queued one off the queue; AdaLoRA shows its final rank allocation; X-LoRA over two LoRA experts (trained through
the library beforehand) finishes and the generation box answers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from lycotrain.engine.config import Config
from tests.browser.conftest import (ARTIFACTS, AppServer, choose, fill, open_accordion, open_tab, use_demo_model,
                                    wait_for_message, wait_progress)

pytestmark = pytest.mark.browser

TINY_LM = "builtin:tiny-llama"
RECORDS = [{"instruction": f"Say the word number {i}.", "input": "", "output": f"word {i} " * 3} for i in range(8)]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("text-data") / "tiny.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in RECORDS))
    return path


def text_tab(page, dataset: Path, method: str, steps: int) -> None:
    """The text tab set up for a short run of ``method`` on the built-in tiny LM."""
    open_tab(page, "Text", "#text-start")
    use_demo_model(page, "text")
    fill(page, "text-dataset-path", dataset)
    fill(page, "text-dataset-max-length", 64)
    choose(page, "text-network-method", method)
    fill(page, "text-training-max-steps", steps)


def set_output_name(page, name: str) -> None:
    if not page.locator("#text-save-output-name").is_visible():
        open_accordion(page, "Samples, saving, presets")
    fill(page, "text-save-output-name", name)


def job(app_server: AppServer, name: str) -> dict:
    return next(j for j in app_server.jobs() if j["name"] == name)


# ---- scenarios ----------------------------------------------------------------------------------------------
def test_runs_queue_behind_the_running_one(page, app_server: AppServer, dataset: Path) -> None:
    app_server.wait_idle()
    text_tab(page, dataset, "lora", steps=120)
    set_output_name(page, "queue-first")
    page.locator("#text-start").click()
    wait_for_message(page, "text", "Run queue-first started")
    fill(page, "text-training-max-steps", 3)
    set_output_name(page, "queue-cancelled")  # Stop on a queued run takes it off the queue
    page.locator("#text-start").click()
    wait_for_message(page, "text", "Run queue-cancelled queued")
    wait_progress(page, "text", lambda s: s["text"].startswith("queue-cancelled") and s["state"] == "queued")
    page.locator("#text-stop").click()
    assert "cancelled before it started" in wait_progress(page, "text", lambda s: s["state"] == "cancelled")["text"]
    set_output_name(page, "queue-second")
    page.locator("#text-start").click()
    wait_for_message(page, "text", r"Run queue-second queued \(another run is in progress\)")
    queued = wait_progress(page, "text", lambda s: s["text"].startswith("queue-second"), timeout_s=30)
    assert queued["state"] == "queued" and "waiting for the running job to end" in queued["text"]
    assert job(app_server, "queue-first")["state"] == "running"
    page.screenshot(path=str(ARTIFACTS / "text-queued.png"), full_page=True)
    done = wait_progress(page, "text", lambda s: s["state"] == "finished")
    assert done["text"].startswith("queue-second") and "step 3 / 3" in done["text"]
    first, second = job(app_server, "queue-first"), job(app_server, "queue-second")
    assert first["state"] == second["state"] == "finished"
    assert second["started"] >= first["ended"], "the queued run started before the running one ended"
    cancelled = job(app_server, "queue-cancelled")
    assert cancelled["state"] == "cancelled" and cancelled["started"] is None
    choose(page, "text-network-method", "xlora")  # the finished LoRA runs are offered as X-LoRA experts
    page.get_by_role("button", name="Refresh the expert list").click()
    page.locator("#text-network-experts input").first.click()
    for name in ("queue-first", "queue-second"):
        page.get_by_role("option", name=f"{name} (adapter)").wait_for()


def test_adalora_run_shows_the_final_rank_allocation(page, app_server: AppServer, dataset: Path) -> None:
    app_server.wait_idle()
    text_tab(page, dataset, "adalora", steps=6)
    for name, value in (("init-r", 4), ("target-r", 2), ("tinit", 1), ("tfinal", 2), ("delta-t", 1)):
        fill(page, f"text-network-{name}", value)
    set_output_name(page, "adalora-ranks")
    page.locator("#text-start").click()
    wait_for_message(page, "text", "started|queued")
    wait_progress(page, "text", lambda s: s["state"] == "finished" and s["text"].startswith("adalora-ranks"))
    details = page.locator("#text-run-details")
    details.get_by_text("AdaLoRA rank allocation").wait_for()
    text = details.inner_text()
    header = re.search(r"fixed at step (\d+); total rank (\d+), budget (\d+)", text)
    assert header, text
    step, total, budget = map(int, header.groups())
    ranks = [int(cell) for cell in details.locator("table tbody tr td:last-child").all_inner_texts()]
    assert step == 6 - 2 and ranks and total == budget == 2 * len(ranks) == sum(ranks)
    assert all(0 <= rank <= 4 for rank in ranks)
    saved = json.loads((Path(job(app_server, "adalora-ranks")["run_dir"]) / "adapter" /
                        "adapter_config.json").read_text())
    assert sum(map(sum, saved["rank_pattern"].values())) == sum(ranks)  # the page shows what was saved
    page.screenshot(path=str(ARTIFACTS / "text-adalora-ranks.png"), full_page=True)


def test_xlora_over_two_lora_experts_and_generation(page, app_server: AppServer, dataset: Path,
                                                    tmp_path: Path) -> None:
    experts = []
    for name, records in (("expert-a", RECORDS[:4]), ("expert-b", RECORDS[4:])):
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(record) + "\n" for record in records))
        app_server.train(Config.from_dict({
            "task": "text", "run_dir": str(tmp_path / name), "model": {"path": TINY_LM},
            "dataset": {"path": str(data), "max_length": 64}, "network": {"method": "lora", "rank": 4},
            "training": {"max_steps": 2, "batch_size": 4}, "sample": {"at_end": False}}))
        experts.append(tmp_path / name / "adapter")
    app_server.wait_idle()
    text_tab(page, dataset, "xlora", steps=4)
    picker = page.locator("#text-network-experts input").first
    for folder in experts:  # typed in: folders trained outside the app are not in its run list
        picker.fill(str(folder))
        picker.press("Enter")
    for folder in experts:
        page.locator("#text-network-experts").get_by_text(str(folder)).wait_for()
    set_output_name(page, "xlora-two-experts")
    page.locator("#text-start").click()
    wait_for_message(page, "text", "started|queued")
    wait_progress(page, "text", lambda s: s["state"] == "finished" and s["text"].startswith("xlora-two-experts"))
    saved = Path(job(app_server, "xlora-two-experts")["run_dir"]) / "adapter"
    assert len(json.loads((saved / "adapter_config.json").read_text())["adapters"]) == 2
    for index, folder in enumerate(experts):  # the experts picked are the ones saved with the X-LoRA folder
        copied, picked = (load_file(str(f / "adapter_model.safetensors")) for f in (saved / "experts" / str(index),
                                                                                    folder))
        assert copied.keys() == picked.keys() and all((copied[k] == picked[k]).all() for k in picked)
    fill(page, "text-gen-prompt", "Say the word number 3.")
    page.locator("#text-generate").click()
    page.wait_for_function("document.querySelector('#text-gen-adapted textarea').value.length > 0",
                           timeout=180_000)
    assert page.locator("#text-gen-base textarea").input_value()
    assert "Traceback" not in page.locator("body").inner_text()
    page.screenshot(path=str(ARTIFACTS / "text-xlora-generated.png"), full_page=True)
