"""The GUI in a real browser, against the real engine: tiny runs on the built-in demo models (a few steps each)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.browser.conftest import (ARTIFACTS, AppServer, choose, fill, open_accordion, use_demo_model,
                                    wait_for_message, wait_progress)

pytestmark = pytest.mark.browser

ALPACA = [{"instruction": f"Say the word number {i}.", "input": "", "output": f"word {i} " * 3} for i in range(8)]


# ---- page helpers (the shared ones are in conftest.py) ------------------------------------------------
def loss_points(page, prefix: str) -> int:
    path = page.locator(f"#{prefix}-loss-plot g.mark-line path")
    if path.count() == 0:
        return 0
    return len(re.findall(r"[ML]", path.first.get_attribute("d") or ""))


def setup_demo_image_run(page, steps: int, preview_every: int = 0) -> None:
    use_demo_model(page, "image")
    page.locator("#image-demo-data").click()
    wait_for_message(page, "image", "Demo dataset created")
    choose(page, "image-network-method", "loha")
    for elem_id, value in (("image-dataset-resolution", 64), ("image-dataset-min-bucket-resolution", 64),
                           ("image-dataset-max-bucket-resolution", 128), ("image-network-rank", 4),
                           ("image-training-max-steps", steps), ("image-training-lr", 0.001)):
        fill(page, elem_id, value)
    open_accordion(page, "Previews")
    fill(page, "image-sample-prompts", "lyco, red circle")
    fill(page, "image-sample-steps", 2)
    fill(page, "image-sample-every-n-steps", preview_every)


# ---- scenarios ----------------------------------------------------------------------------------------------
def test_page_comes_up_fast_and_each_tab_renders(page, app_server: AppServer) -> None:
    assert app_server.startup_s < 30
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "tab-image.png"), full_page=True)
    page.get_by_role("tab", name="Text").click()
    page.locator("#text-start").wait_for()
    page.screenshot(path=str(ARTIFACTS / "tab-text.png"), full_page=True)
    page.get_by_role("tab", name="Tools").click()
    page.locator("#tools-inspect").wait_for()
    page.screenshot(path=str(ARTIFACTS / "tab-tools.png"), full_page=True)


def test_bad_input_shows_a_message_and_the_app_keeps_working(page, tmp_path: Path) -> None:
    use_demo_model(page, "image")
    page.locator("#image-start").click()
    assert "dataset.path is empty" in wait_for_message(page, "image", "dataset.path")
    fill(page, "image-dataset-path", "/no/such/folder")
    page.locator("#image-start").click()
    wait_for_message(page, "image", "does not exist")
    choose(page, "image-network-method", "lora")
    fill(page, "image-network-rank", 0)
    page.locator("#image-start").click()
    assert "allowed" in wait_for_message(page, "image", "network.rank")
    (tmp_path / "notes.txt").write_text("just some text")
    (tmp_path / "photo.png").write_text("a text file named like an image")
    page.locator("#image-upload input[type=file]").set_input_files([str(tmp_path / "notes.txt"),
                                                                    str(tmp_path / "photo.png")])
    text = wait_for_message(page, "image", "rejected")
    assert "not an image" in text and "not a readable image" in text and "Traceback" not in text
    fill(page, "image-network-rank", 4)  # fixed: the same page keeps working
    open_accordion(page, "Presets and CLI command")
    page.locator("#image-show-cli").click()
    page.wait_for_function("document.querySelector('#image-cli').innerText.includes('lycotrain train')")
    assert 'network.method="lora"' in page.locator("#image-cli").inner_text()


def test_caption_editor_saves_to_the_caption_file(page, app_server: AppServer) -> None:
    page.locator("#image-demo-data").click()
    folder = Path(re.search(r"created in (\S+) ", wait_for_message(page, "image", "Demo dataset created")).group(1))
    open_accordion(page, "Caption editor")
    page.locator("#image-captions-load").click()
    wait_for_message(page, "image", r"10 image\(s\)")
    page.locator("#image-captions-gallery button img").first.click()
    page.wait_for_function("document.querySelector('#image-caption-text textarea').value.startsWith('lyco')")
    fill(page, "image-caption-text", "lyco, edited in the browser")
    page.locator("#image-caption-save").click()
    wait_for_message(page, "image", "Saved")
    assert (folder / "00_red_circle.txt").read_text().strip() == "lyco, edited in the browser"


def test_demo_loha_run_live_view_and_download(page, app_server: AppServer, tmp_path: Path) -> None:
    setup_demo_image_run(page, steps=6, preview_every=3)
    page.locator("#image-start").click()
    wait_for_message(page, "image", "started|queued")
    first = wait_progress(page, "image", lambda s: s["step"] >= 1)
    wait_progress(page, "image", lambda s: s["step"] > first["step"] or s["state"] == "finished")
    done = wait_progress(page, "image", lambda s: s["state"] == "finished")
    assert "step 6 / 6" in done["text"]
    page.wait_for_function("document.querySelectorAll('#image-loss-plot g.mark-line path').length > 0")
    assert loss_points(page, "image") >= 2
    assert page.locator("#image-previews img").count() >= 1
    assert page.evaluate("""() => [...document.querySelectorAll('#image-previews img')].every(image =>
        image.getBoundingClientRect().right <= document.querySelector('#image-previews').getBoundingClientRect().right
    )"""), "preview tiles overflow the gallery (beside the plot three tiles did not fit)"
    link = page.locator("#image-downloads a[download$='.safetensors']").first
    try:
        link.wait_for()
    except Exception:
        raise AssertionError(f"no .safetensors download: {page.locator('#image-downloads').inner_html()[:3000]}")
    response = page.request.get(link.get_attribute("href"))
    assert response.ok
    (tmp_path / "adapter.safetensors").write_bytes(response.body())
    from safetensors import safe_open

    with safe_open(str(tmp_path / "adapter.safetensors"), framework="numpy") as f:
        keys = list(f.keys())
        assert keys and any("hada_w1_a" in k for k in keys)
    page.screenshot(path=str(ARTIFACTS / "run-finished.png"), full_page=True)
    app_server.wait_idle()
    exported = next(Path(j["run_dir"]) for j in app_server.jobs() if j["state"] == "finished" and j["task"] == "image")
    check_tools(page, next(exported.glob("*.safetensors")))


def check_tools(page, adapter: Path) -> None:
    """Tools tab on the exported file: the per-WebUI report, and the conversion to a LoRA file."""
    page.get_by_role("tab", name="Tools").click()
    fill(page, "tools-path", adapter)
    fill(page, "tools-model", "builtin:tiny-sd1")
    page.locator("#tools-inspect").click()
    page.wait_for_function("document.querySelector('#tools-output textarea').value.includes('comfyui')",
                           timeout=120_000)
    output = page.locator("#tools-output textarea").input_value()
    assert "loha" in output and "a1111" in output and "forge" in output
    page.get_by_role("tab", name="Extract / convert to LoRA").click()
    fill(page, "tools-extract-rank", 2)
    page.locator("#tools-extract").click()
    page.locator("#tools-files a[download$='-lora.safetensors']").wait_for(timeout=120_000)
    page.screenshot(path=str(ARTIFACTS / "tools-converted.png"), full_page=True)


def test_reload_reattaches_and_stop_writes_a_checkpoint(page, app_server: AppServer) -> None:
    app_server.wait_idle()
    setup_demo_image_run(page, steps=400)
    page.locator("#image-start").click()
    wait_for_message(page, "image", "started")
    before = wait_progress(page, "image", lambda s: s["step"] >= 2)
    name = before["text"].split(" — ")[0]
    page.reload()
    page.locator("#image-start").wait_for()
    after = wait_progress(page, "image", lambda s: s["step"] > before["step"])  # same run, still advancing
    assert after["text"].startswith(name) and after["state"] == "running"
    page.locator("#image-stop").click()
    stopped = wait_progress(page, "image", lambda s: s["state"] == "stopped", timeout_s=120)
    assert stopped["step"] < 400
    job = next(j for j in app_server.jobs() if j["name"] == name.strip() and j["state"] == "stopped")
    checkpoints = list((Path(job["run_dir"]) / "checkpoints").glob("step-*"))
    assert checkpoints, "Stop must leave a checkpoint"
    events = [json.loads(line) for line in (Path(job["run_dir"]) / "events.jsonl").read_text().splitlines()]
    assert events[-1]["type"] == "end" and events[-1]["status"] == "stopped"


def test_text_tab_llama_adapter_run_and_generation(page, app_server: AppServer, tmp_path: Path) -> None:
    app_server.wait_idle()
    page.get_by_role("tab", name="Text").click()
    use_demo_model(page, "text")
    data = tmp_path / "tiny.jsonl"
    data.write_text("\n".join(json.dumps(record) for record in ALPACA) + "\n")
    page.locator("#text-upload input[type=file]").set_input_files(str(data))
    wait_for_message(page, "text", "Dataset saved")
    choose(page, "text-network-method", "llama_adapter")
    fill(page, "text-training-max-steps", 4)
    fill(page, "text-training-lr", 0.01)
    fill(page, "text-dataset-max-length", 64)
    page.locator("#text-start").click()
    wait_for_message(page, "text", "started|queued")
    wait_progress(page, "text", lambda s: s["state"] == "finished")
    page.wait_for_function("document.querySelectorAll('#text-loss-plot g.mark-line path').length > 0")
    fill(page, "text-gen-prompt", "Say the word number 3.")
    page.locator("#text-generate").click()
    page.wait_for_function("document.querySelector('#text-gen-adapted textarea').value.length > 0",
                           timeout=180_000)
    assert page.locator("#text-gen-base textarea").input_value()
    page.screenshot(path=str(ARTIFACTS / "text-run-finished.png"), full_page=True)


CLIPPED_CHECKBOX_LABELS = """() => [...document.querySelectorAll('.checkbox-container .label-text')]
  .filter(label => label.offsetParent && label.getBoundingClientRect().right >
                   label.closest('.block').getBoundingClientRect().right + 1)
  .map(label => label.innerText)"""


def test_no_checkbox_label_is_squeezed_out_of_sight(page) -> None:
    """In a row of eight fields the 'gradient checkpointing' box got 32 px: its label overflowed the box, out of
    sight."""
    assert page.evaluate(CLIPPED_CHECKBOX_LABELS) == []
    open_accordion(page, "Previews")
    open_accordion(page, "Saving")
    assert page.evaluate(CLIPPED_CHECKBOX_LABELS) == []
    page.get_by_role("tab", name="Text").click()
    page.locator("#text-start").wait_for()
    assert page.evaluate(CLIPPED_CHECKBOX_LABELS) == []
