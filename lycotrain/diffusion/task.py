"""The image task: a Stable Diffusion UNet (and optionally its text encoders) learns through adapters.

One training step (``training_step``): latents (from the cache, or encoded now) -> noise (+ offset) and a
timestep per image -> the UNet predicts epsilon or v -> L2 or pseudo-Huber loss per image, weighted by
min-SNR gamma and by the prior-loss weight of regularization images -> plus the adapters' regulariser (HRA).

With ``training.fixed_noise`` each image gets the same noise and timestep at every step (drawn from a
generator seeded by the run seed and the image's file name, so a moved dataset draws the same): the
training-set loss then measures learning alone, which is what the learning tests need.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from lycotrain.engine.config import Config, NetworkConfig
from lycotrain.errors import ConfigError, DatasetError

# the constructor keywords each image method takes from [network] (see docs/contracts.md, Adapters)
_METHOD_PARAMS: dict[str, tuple[str, ...]] = {
    "lora": ("rank", "alpha", "dropout", "rank_dropout", "module_dropout"),
    "loha": ("rank", "alpha", "rank_dropout", "module_dropout"),
    "lokr": ("rank", "alpha", "factor", "decompose_both", "rank_dropout", "module_dropout"),
    "oft": ("block_size", "constraint", "rescaled", "module_dropout"),
    "hra": ("rank", "apply_gs", "reg_lambda", "module_dropout"),
}
_CONFIG_NAMES = {"apply_gs": "hra_apply_gs", "reg_lambda": "hra_lambda"}


def adapter_params(network: NetworkConfig) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(params for Linear/1x1 layers, params for kxk convolutions or None for the same) from ``[network]``."""
    params = {key: getattr(network, _CONFIG_NAMES.get(key, key)) for key in _METHOD_PARAMS[network.method]}
    if not network.conv_rank or "rank" not in params:
        return params, None
    return params, {**params, "rank": network.conv_rank, "alpha": network.conv_alpha or network.conv_rank}


def inject_network(network: NetworkConfig, family: str, unet: torch.nn.Module,
                   text_encoders: list[torch.nn.Module]) -> tuple[Any, list[torch.nn.Module]]:
    """``[network]``'s adapters in the components it trains (the UNet and/or the text encoders): the adapter set
    and those components. The task and the memory estimate (on meta models) both inject through here, so the
    estimate counts exactly what training trains."""
    from lycotrain.inject import inject_pipeline

    components: dict[str, torch.nn.Module] = {"unet": unet} if network.train_unet else {}
    if network.train_text_encoder:
        components.update(zip(("text_encoder", "text_encoder_2"), text_encoders))
    params, conv_params = adapter_params(network)
    adapters = inject_pipeline(components, family, method=network.method, params=params, conv_params=conv_params,
                               preset=network.preset, include=network.include, exclude=network.exclude,
                               overrides=list(network.overrides.items()))
    return adapters, list(components.values())


class DiffusionTask:
    """Implements ``lycotrain.engine.task.Task`` for Stable Diffusion 1.x / 2.x / XL."""

    # ---- setup ------------------------------------------------------------------------------------------
    def setup(self, config: Config, accelerator: Any, events: Any) -> None:
        from lycotrain.diffusion.dataset import ImageDataset
        from lycotrain.diffusion.lint import add_memory_estimate, lint_dataset
        from lycotrain.diffusion.memory import spec_from_pipeline
        from lycotrain.diffusion.models import load_pipeline

        self.config, self.accelerator, self.events = config, accelerator, events
        self.run_dir = Path(config.run_dir)
        self.device = accelerator.device
        self.model = load_pipeline(config.model.path, family=config.model.family)
        self.pipeline = self.model.pipeline
        self._prepare_models()
        self._inject()
        self.dataset = ImageDataset.from_config(config.dataset, seed=config.seed)
        t = config.training
        report = lint_dataset(self.dataset, batch_size=t.batch_size, grad_accum=t.grad_accum, epochs=t.epochs,
                              max_steps=t.max_steps, num_processes=accelerator.num_processes)
        if accelerator.is_main_process:  # the only process that reports it; the others would idle meanwhile
            add_memory_estimate(report, config, lambda: spec_from_pipeline(self.model),
                                weight_dtype=self.pipeline.unet.dtype, device=self.device)
        events.emit("preflight", report=report.to_dict())
        if report.memory is not None and (too_big := report.memory.fit_warning()):
            events.emit("warning", message=too_big)
        self._build_caches()

    def _prepare_models(self) -> None:
        from diffusers import DDPMScheduler

        pipe, config = self.pipeline, self.config
        self.text_encoders, self.tokenizers = list(self.model.text_encoders), list(self.model.tokenizers)
        self.family = self.model.family.removesuffix("-v")  # sd1 | sd2 | sdxl: what the file formats name
        precision = config.training.mixed_precision
        if precision != "no" and not self.accelerator.native_amp:  # accelerate has no fp16 autocast on the CPU
            self.events.emit("warning", message=f'training.mixed_precision = "{precision}" is not available on '
                                                f'{self.device.type}: training in fp32 (set "bf16" or "no")')
            precision = "no"
        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)
        for model in [pipe.unet, *self.text_encoders]:
            model.requires_grad_(False).to(self.device, weight_dtype)
        pipe.vae.requires_grad_(False).to(self.device, torch.float32)  # fp16 VAEs overflow (NaN/black images)
        prediction = config.model.prediction_type
        if prediction == "auto":
            prediction = self.model.prediction_type
        self.prediction_type = prediction
        if config.training.zero_terminal_snr and prediction == "epsilon":
            raise ConfigError("training.zero_terminal_snr = true needs a v-prediction model: at the last timestep "
                              "the noisy input is pure noise, from which an epsilon model cannot recover the image "
                              "(samplers divide by zero there); set model.prediction_type = \"v_prediction\" for a "
                              "v model, or turn zero_terminal_snr off")
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction,
                                                         rescale_betas_zero_snr=config.training.zero_terminal_snr)
        self.alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(self.device)
        if config.training.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            if config.network.train_text_encoder:
                for encoder in self.text_encoders:
                    encoder.gradient_checkpointing_enable()

    def _inject(self) -> None:
        self.adapters, trained = inject_network(self.config.network, self.family, self.pipeline.unet,
                                                self.text_encoders)
        for model in trained:
            model.train()

    def _build_caches(self) -> None:
        """Latents once per image (main process first, the others then find them cached); text-encoder outputs
        when the encoders are frozen and the captions fixed."""
        from lycotrain.diffusion.cache import LatentCache, TextEncoderCache, default_cache_dir, fill_latent_cache, \
            fill_text_cache

        dataset_config, accelerator = self.config.dataset, self.accelerator
        root = default_cache_dir()
        for turn in ("main", "others"):
            if accelerator.is_main_process == (turn == "main"):
                if dataset_config.cache_latents:
                    fill_latent_cache(self.dataset, LatentCache.for_vae(root, self.pipeline.vae), self.pipeline.vae)
                if dataset_config.cache_text_encoder and not self.config.network.train_text_encoder:
                    try:
                        cache = TextEncoderCache.for_encoders(root, *self.text_encoders, extra=self.family)
                        fill_text_cache(self.dataset, cache, self._encode_for_cache)
                    except DatasetError as why:  # shuffled or tag-dropped captions: encode every step instead
                        self.events.emit("warning", message=f"text-encoder outputs not cached: {why}")
            accelerator.wait_for_everyone()

    def _encode_for_cache(self, captions: list[str]) -> dict[str, torch.Tensor]:
        hidden, pooled = self._encode_text(captions)
        return {"hidden": hidden} if pooled is None else {"hidden": hidden, "pooled": pooled}

    # ---- what the loop asks for ------------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        training = self.config.training
        groups = []
        unet_params = self.adapters.parameters("lora_unet")
        te_params = self.adapters.parameters("lora_te")
        if unet_params:
            groups.append({"params": unet_params, "lr": training.lr})
        if te_params:
            groups.append({"params": te_params, "lr": training.text_encoder_lr or training.lr})
        return groups

    def dataloader(self, epoch: int) -> DataLoader:
        from lycotrain.diffusion.dataset import collate

        sampler = self.dataset.sampler(self.config.training.batch_size)  # the loop shards over processes
        return DataLoader(self.dataset, batch_sampler=sampler.epoch_batches(epoch), collate_fn=collate)

    def training_step(self, batch: dict[str, Any], step: int) -> torch.Tensor:
        latents = self._latents(batch)
        noise, timesteps = self._noise_and_timesteps(latents, batch["paths"])
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        hidden, pooled = self._text_conditioning(batch)
        prediction = self.pipeline.unet(noisy, timesteps, encoder_hidden_states=hidden,
                                        added_cond_kwargs=self._sdxl_conditioning(batch, pooled)).sample
        if self.prediction_type == "v_prediction":
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        per_image = self._elementwise_loss(prediction.float(), target.float()).mean(dim=(1, 2, 3))
        per_image = per_image * self._snr_weights(timesteps) * batch["loss_weights"]
        loss = per_image.mean()
        extra = self.adapters.extra_loss()
        return loss if extra is None else loss + extra

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Nothing to do between steps for image adapters."""

    # ---- the pieces of a step ---------------------------------------------------------------------------------
    def _latents(self, batch: dict[str, Any]) -> torch.Tensor:
        from lycotrain.diffusion.cache import encode_latents

        vae = self.pipeline.vae
        latents = batch["latents"] if "latents" in batch else encode_latents(vae, batch["pixel_values"])
        return latents.to(self.device) * vae.config.scaling_factor

    def _noise_and_timesteps(self, latents: torch.Tensor, paths: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        training, count = self.config.training, self.noise_scheduler.config.num_train_timesteps
        batch_size = latents.shape[0]
        if training.fixed_noise:  # the same noise and timestep for an image at every step
            noises, steps = [], []
            for path in paths:
                # keyed on the file name, not the full path: a moved or copied dataset draws the same noise
                # (and files of the same name in two folders share theirs; fine for a debugging option)
                name = Path(path).name
                generator = torch.Generator().manual_seed(self.config.seed + zlib.crc32(name.encode()))
                noises.append(torch.randn(latents.shape[1:], generator=generator))
                offset = torch.randn(latents.shape[1], 1, 1, generator=generator)
                noises[-1] = noises[-1] + training.noise_offset * offset
                steps.append(torch.randint(0, count, (), generator=generator))
            return torch.stack(noises).to(latents), torch.stack(steps).to(self.device)
        noise = torch.randn_like(latents)
        if training.noise_offset:
            noise = noise + training.noise_offset * torch.randn(batch_size, latents.shape[1], 1, 1).to(latents)
        return noise, torch.randint(0, count, (batch_size,), device=self.device)

    def _text_conditioning(self, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if "text_embeds" in batch:
            embeds = batch["text_embeds"]
            return embeds["hidden"].to(self.device), embeds.get("pooled")
        with torch.set_grad_enabled(self.config.network.train_text_encoder and torch.is_grad_enabled()):
            return self._encode_text(batch["captions"])

    def _encode_text(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """SD1/SD2: the last hidden state. SDXL: both encoders' penultimate states, concatenated, and the
        second encoder's pooled projection."""
        outputs, pooled = [], None
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(self.device)
            if self.family != "sdxl":
                return encoder(ids).last_hidden_state, None
            result = encoder(ids, output_hidden_states=True)
            outputs.append(result.hidden_states[-2])
            pooled = getattr(result, "text_embeds", pooled)
        return torch.cat(outputs, dim=-1), pooled

    def _sdxl_conditioning(self, batch: dict[str, Any], pooled: torch.Tensor | None) -> dict[str, Any] | None:
        if self.family != "sdxl":
            return None
        time_ids = torch.cat([batch["original_size"], batch["crop_top_left"], batch["target_size"]], dim=1)
        return {"text_embeds": pooled.to(self.device), "time_ids": time_ids.to(self.device, pooled.dtype)}

    def _elementwise_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.config.training.loss == "huber":  # pseudo-Huber: quadratic near 0, linear far away
            delta = self.config.training.huber_delta
            return 2 * delta * (torch.sqrt((prediction - target) ** 2 + delta**2) - delta)
        return F.mse_loss(prediction, target, reduction="none")

    def _snr_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v."""
        gamma = self.config.training.min_snr_gamma
        if not gamma:
            return torch.ones(timesteps.shape, device=self.device)
        alpha_bar = self.alphas_cumprod[timesteps]
        snr = alpha_bar / (1 - alpha_bar).clamp(min=1e-8)
        clipped = snr.clamp(max=gamma)
        return clipped / (snr + 1) if self.prediction_type == "v_prediction" else clipped / snr.clamp(min=1e-8)

    # ---- previews and files -----------------------------------------------------------------------------------
    def preview(self, step: int, exported: dict[str, Path] | None = None) -> dict[str, Any]:
        """Render the prompts. With ``exported``, the training adapters are removed and the exported WebUI file
        is loaded back onto the base model through lycotrain.formats: the final preview shows what a WebUI
        gets. (The run is over then; the task's adapters are gone afterwards.)"""
        models = list(self.model.components().values())
        for model in models:
            model.eval()
        try:
            if exported is None:
                paths = self._render(f"step-{step:06d}")
            else:
                paths = self._render_from_file(Path(exported["adapter"]))
                self._write_sidecars(Path(exported["adapter"]), preview=paths[0] if paths else None)
        finally:
            for model in models:
                model.train()
        return {"images": [str(p.relative_to(self.run_dir)) for p in paths]}

    def _render(self, stem: str) -> list[Path]:
        from lycotrain.diffusion.sampling import PREVIEW_DIR, render_previews

        sample = self.config.sample
        with self.accelerator.autocast():  # fp32 adapters on fp16/bf16 weights, as in training
            return render_previews(self.pipeline, sample.prompts, sampler=sample.sampler,
                                   scheduler_config=self.noise_scheduler.config,
                                   default_size=self.config.dataset.resolution,
                                   out_dir=self.run_dir / PREVIEW_DIR, stem=stem)

    def _render_from_file(self, path: Path) -> list[Path]:
        from lycotrain.formats.kohya import apply_file

        self.adapters.remove()
        reloaded = apply_file(self.model.components(), path)
        try:
            return self._render("final")
        finally:
            reloaded.remove()

    def save_adapter(self, out_dir: Path, step: int) -> dict[str, Path]:
        """The WebUI file (+ the native file for HRA, + the A1111 sidecar) into ``out_dir``; for the final
        export (``out_dir`` is the run folder) also the A1111/Forge/ComfyUI compatibility report."""
        from lycotrain.formats.compat import compat_paths, write_compat_report
        from lycotrain.formats.kohya import save_webui_file

        path = Path(out_dir) / f"{self.output_name}.safetensors"
        result = save_webui_file(path, self.adapters, family=self.family, unet_config=self.pipeline.unet.config,
                                 metadata=self._metadata(step), dtype=self.config.save.dtype,
                                 oft_as_lora=self.config.save.oft_as_lora)
        for warning in result.warnings:
            self.events.emit("warning", message=warning)
        outputs = {"adapter": path}
        if result.native_path is not None:
            outputs["native"] = result.native_path
        outputs["sidecar"] = self._write_sidecars(path)[-1]
        if Path(out_dir).resolve() == self.run_dir.resolve():
            write_compat_report(path, self.model.components())
            outputs["compat_json"], outputs["compat_report"] = compat_paths(path)
        return outputs

    @property
    def output_name(self) -> str:
        return self.config.save.output_name or self.run_dir.resolve().name

    def _metadata(self, step: int) -> dict[str, str]:
        from lycotrain.formats.metadata import build_metadata

        c, n = self.config, self.config.network
        as_lora = n.method == "hra" or (n.method == "oft" and c.save.oft_as_lora)
        stored = "lora" if as_lora else n.method  # HRA (and OFT on request) are written as their exact LoRA
        rank = n.block_size if n.method == "oft" else n.rank
        return build_metadata(
            family=self.family, method=stored, rank=rank, alpha=n.alpha or rank, output_name=self.output_name,
            resolution=c.dataset.resolution, v_prediction=self.prediction_type == "v_prediction",
            network_args={"preset": n.preset, "trained_method": n.method},
            training={"learning_rate": c.training.lr, "steps": step, "optimizer": c.training.optimizer,
                      "lr_scheduler": c.training.scheduler, "seed": c.seed},
            trigger_phrase=c.save.activation_text or c.dataset.trigger_word or None,
            base_model_name=Path(c.model.path).name)

    def _write_sidecars(self, path: Path, preview: Path | None = None) -> list[Path]:
        from lycotrain.formats.metadata import write_sidecars

        save = self.config.save
        return write_sidecars(path, family=self.family, preview=preview,
                              activation_text=save.activation_text or self.config.dataset.trigger_word,
                              preferred_weight=save.preferred_weight)

    def state_dict(self) -> dict[str, Any]:
        return {"adapters": self.adapters.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.adapters.load_state_dict(state["adapters"])
