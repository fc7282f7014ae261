"""The Gradio app: three tabs over one job manager. The app process stays light — it never imports torch,
diffusers or transformers; training, generation and the file tools run in child processes."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # offline by default: no phoning home

import gradio as gr  # noqa: E402

from lycotrain.errors import ConfigError  # noqa: E402
from lycotrain.jobs import JobManager  # noqa: E402
from lycotrain.ui.image_tab import ImageTab  # noqa: E402
from lycotrain.ui.text_tab import TextTab  # noqa: E402
from lycotrain.ui.tools_tab import ToolsTab  # noqa: E402

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860


def build_app(manager: JobManager) -> gr.Blocks:
    with gr.Blocks(title="lycotrain", analytics_enabled=False) as app:
        gr.Markdown("## lycotrain — adapters for Stable Diffusion and language models")
        with gr.Tabs():
            with gr.Tab("Image", id="image", elem_id="tab-image"):
                image = ImageTab(manager)
            with gr.Tab("Text", id="text", elem_id="tab-text"):
                text = TextTab(manager)
            with gr.Tab("Tools", id="tools", elem_id="tab-tools"):
                ToolsTab(manager)
        for tab in (image, text):
            app.load(tab.preset_choices, None, tab.preset_picker, queue=False)
    return app


def is_loopback(host: str) -> bool:
    """True when ``host`` only listens on this machine (127.0.0.0/8, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


def parse_auth(text: str | None) -> tuple[str, str] | None:
    if not text:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth must be USER:PASSWORD, e.g. --auth alice:s3cret")
    return user, password


def exposure_warning(host: str, credentials: tuple[str, str] | None) -> str | None:
    if is_loopback(host) or credentials is not None:
        return None
    return (f"warning: listening on {host} without --auth: anyone who can reach this machine can start training "
            "jobs and read files the server can read. Add --auth USER:PASSWORD.")


def check_port_free(host: str, port: int) -> None:
    """Fail with a message (not Gradio's traceback) when ``host:port`` cannot be listened on, e.g. a second app."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.create_server((host, port), family=family):  # SO_REUSEADDR, as the web server sets it
            pass
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); another program (another "
                          "lycotrain app?) may be using it: choose another --port, or fix --host") from None


def serve(host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, auth: str | None = None, share: bool = False,
          runs_root: str | Path = "runs", block: bool = True) -> gr.Blocks:
    """Start the job scheduler and the web server; warn when the app is reachable from the network unguarded."""
    credentials = parse_auth(auth)
    check_port_free(host, port)
    warning = exposure_warning(host, credentials)
    if warning:
        print(warning, flush=True)
    manager = JobManager(runs_root)
    manager.start_background()
    app = build_app(manager)
    app.queue(default_concurrency_limit=4)
    app.launch(server_name=host, server_port=port, auth=credentials, share=share, inbrowser=False,
               allowed_paths=[str(manager.runs_root)], prevent_thread_lock=not block, footer_links=[],
               quiet=False)
    return app
