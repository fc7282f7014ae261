"""The Tools tab in a real browser: inspect a LoHa file (method, modules, metadata, per-WebUI report), merge it
into the tiny model, convert it to a LoRA, resize that LoRA, and bad input as a message. The LoHa file comes from
a 2-step run of the library on builtin:tiny-sd1 (the app's own built-in model cache)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests._image_runs import image_config
from tests.browser.conftest import ARTIFACTS, AppServer, fill, message, open_tab

pytestmark = pytest.mark.browser

TINY_SD1 = "builtin:tiny-sd1"


@pytest.fixture(scope="module")
def loha_file(app_server: AppServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoHa .safetensors trained for 2 steps on the built-in tiny SD1 (the model the tools are given)."""
    from lycotrain.diffusion.demo_data import make_demo_dataset

    root = tmp_path_factory.mktemp("loha")
    data = make_demo_dataset(root / "data", count=2)
    app_server.train(image_config(root / "run", TINY_SD1, data, network={"method": "loha"},
                                  training={"max_steps": 2}))
    return next((root / "run").glob("*.safetensors"))


# ---- page helpers -------------------------------------------------------------------------------------------
def tools_output(page) -> str:
    return page.locator("#tools-output textarea").input_value()


def run_tool(page, tab: str, button: str, written: str) -> Path:
    """Open the tool's tab, press its button and wait for the file it writes (``*written``) to be listed."""
    open_tab(page, tab, f"#{button}")
    page.locator(f"#{button}").click()
    link = page.locator(f"#tools-files a[download$='{written}']").first
    try:
        link.wait_for(timeout=120_000)
    except Exception:
        raise AssertionError(f"no {written} listed; message {message(page, 'tools')!r}, output {tools_output(page)!r}")
    path = Path(re.search(r"(/\S+" + re.escape(written) + ")", tools_output(page)).group(1))
    assert path.is_file(), f"the output names {path}, which is not on disk"
    return path


def lora_ranks(path: Path) -> set[int]:
    """The rank of every LoRA module in a kohya file (rows of its ``lora_down``), read from the file on disk."""
    with safe_open(str(path), framework="numpy") as f:
        return {f.get_slice(key).get_shape()[0] for key in f.keys() if key.endswith(".lora_down.weight")}


def screenshot(page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"tools-{name}.png"), full_page=True)


def open_tools(page, adapter: Path | str, model: str = TINY_SD1) -> None:
    open_tab(page, "Tools", "#tools-inspect")
    fill(page, "tools-path", adapter)
    fill(page, "tools-model", model)


# ---- scenarios ----------------------------------------------------------------------------------------------
def test_inspect_merge_extract_resize(page, app_server: AppServer, loha_file: Path) -> None:
    open_tools(page, loha_file)
    page.locator("#tools-inspect").click()
    page.wait_for_function("document.querySelector('#tools-output textarea').value.includes('comfyui')",
                           timeout=120_000)
    report = tools_output(page)
    with safe_open(str(loha_file), framework="numpy") as f:
        modules = {key.split(".")[0] for key in f.keys()}
    assert re.search(rf"methods\s*:\s*loha x{len(modules)}", report), report
    assert re.search(rf"modules\s*:\s*{len(modules)}\b", report), report
    assert "ss_network_module = lycoris.kohya" in report  # the metadata
    for webui in ("a1111", "forge", "comfyui"):
        assert re.search(rf"^\s*{webui}\s+OK", report, re.MULTILINE), f"{webui} line missing or not OK:\n{report}"
    screenshot(page, "inspect")

    merged = run_tool(page, "Merge into a model", "tools-merge", "-merged.safetensors")
    assert f"merged {len(modules)} modules" in tools_output(page)
    screenshot(page, "merged")
    from lycotrain.diffusion.models import load_pipeline

    with app_server.builtin_models():
        base, baked = (load_pipeline(p, family="sd1").pipeline.unet.state_dict() for p in (TINY_SD1, merged))
    changed = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_") for k in base
               if not torch.equal(base[k], baked[k])}
    assert changed == {m for m in modules if m.startswith("lora_unet_")}  # exactly the LoHa's layers moved

    open_tab(page, "Extract / convert to LoRA", "#tools-extract")
    fill(page, "tools-extract-rank", 2)
    lora = run_tool(page, "Extract / convert to LoRA", "tools-extract", "-lora.safetensors")
    assert "--rank 2 " in tools_output(page) and lora_ranks(lora) == {2}
    screenshot(page, "extracted")

    fill(page, "tools-path", lora)
    open_tab(page, "Resize a LoRA", "#tools-resize")
    fill(page, "tools-resize-rank", 1)
    resized = run_tool(page, "Resize a LoRA", "tools-resize", "-resized.safetensors")
    assert "--rank 1 " in tools_output(page) and lora_ranks(resized) == {1}
    with safe_open(str(resized), framework="numpy") as f:
        assert len({key.split(".")[0] for key in f.keys()}) == len(modules)
    screenshot(page, "resized")

    fill(page, "tools-path", "/no/such/adapter.safetensors")  # a failure after a success: no stale results
    page.locator("#tools-resize").click()
    page.wait_for_function("document.querySelector('#tools-message').innerText.includes('does not exist')")
    page.wait_for_function("document.querySelectorAll('#tools-files a').length === 0", timeout=5_000)
    assert tools_output(page) == ""


def test_bad_input_in_a_tool_shows_a_message(page, loha_file: Path, tmp_path: Path) -> None:
    open_tools(page, "/no/such/adapter.safetensors")
    page.locator("#tools-inspect").click()
    page.wait_for_function("document.querySelector('#tools-message').innerText.includes('does not exist')")
    assert "/no/such/adapter.safetensors" in message(page, "tools")
    screenshot(page, "bad-path")

    garbage = tmp_path / "notes.safetensors"
    garbage.write_text("not a tensor file")
    fill(page, "tools-path", garbage)
    page.locator("#tools-inspect").click()
    page.wait_for_function("document.querySelector('#tools-message').innerText.includes('notes.safetensors')",
                           timeout=60_000)
    assert "`lycotrain inspect` failed" in message(page, "tools")

    fill(page, "tools-path", loha_file)  # a LoHa is not a LoRA: the command's own advice is shown
    open_tab(page, "Resize a LoRA", "#tools-resize")
    page.locator("#tools-resize").click()
    page.wait_for_function("document.querySelector('#tools-message').innerText.includes('lycotrain extract')",
                           timeout=60_000)
    assert "resize works on LoRA files" in message(page, "tools")
    assert "Traceback" not in page.locator("body").inner_text()
    screenshot(page, "bad-input")
