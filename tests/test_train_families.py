"""Image training beyond SD1. SDXL: the conditioning a training step gives the UNet (both encoders' penultimate
states, TE2's pooled embedding, the size/crop time ids of the sample's bucket) and the previews equal what
diffusers' StableDiffusionXLPipeline computes; SDXL runs learn through the UNet and through both text encoders.
SD2-style v-prediction (with and without zero-terminal-SNR): the training target is diffusers' velocity, and runs
learn. Learning runs use fixed noise, so the training-set loss measures learning alone (see test_train_image.py)."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from _image_runs import DisconnectedTask, events, image_config, learning_run
from lycotrain.diffusion.task import DiffusionTask
from lycotrain.engine.loop import train

# final loss / first loss must be below this; a disconnected run stays at exactly 1. Measured over seeds 0-3 (40
# steps, LoRA): SDXL UNet 0.10-0.16, SDXL text encoders 0.49-0.65; v-prediction UNet 0.06-0.14 with or without
# zero-terminal-SNR. Each margin leaves a gap of at least 0.15 on both sides.
SDXL_MARGIN = {"unet": 0.4, "te": 0.8}
V_MARGIN = 0.4

# Two images that land in the 64x48 bucket of a 56 px grid (steps of 8, sides 32-64), with different crops:
# 100x60 is resized to 80x48 and cropped 8 px from the left; 70x60 to 64x55, cropped 3 px from the top.
# SDXL's time ids per caption: original (height, width), crop (top, left), target (height, width).
BUCKET_IMAGES = {
    "wide": ((100, 60), "lyco, red circle", ((60, 100), (0, 8), (48, 64))),
    # longer than CLIP's 77 tokens: both sides must truncate alike
    "tall": ((70, 60), "blue square, black background, " + " ".join(["detailed"] * 90), ((60, 70), (3, 0), (48, 64))),
}
BUCKET_DATASET = {"resolution": 56, "min_bucket_resolution": 32, "max_bucket_resolution": 64, "bucket_step": 8}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """The tiny SDXL, and the tiny SD1 architecture with a v-prediction scheduler (what an SD2-v model is to
    training: the family names only the file formats' key prefixes)."""
    from lycotrain.diffusion.models import build_tiny_pipeline

    root = tmp_path_factory.mktemp("models")
    v_model = build_tiny_pipeline(root / "v", arch="sd1")
    scheduler = v_model / "scheduler" / "scheduler_config.json"
    scheduler.write_text(json.dumps({**json.loads(scheduler.read_text()), "prediction_type": "v_prediction"}))
    return {"sdxl": build_tiny_pipeline(root / "sdxl", arch="sdxl"), "v": v_model}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from lycotrain.diffusion.demo_data import make_demo_dataset

    return make_demo_dataset(tmp_path_factory.mktemp("demo"), count=2)


@pytest.fixture(scope="module")
def bucket_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bucket")
    for name, (size, caption, _) in BUCKET_IMAGES.items():
        Image.new("RGB", size, (200, 40, 40)).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(caption)
    return folder

pytestmark = pytest.mark.usefixtures("isolated_home")


class RecordingTask(DiffusionTask):
    """Records each step's batch and the keyword arguments of the UNet call of the step."""

    def setup(self, config, accelerator, events):
        super().setup(config, accelerator, events)
        self.batches, self.unet_calls = [], []
        self.pipeline.unet.register_forward_pre_hook(
            lambda module, args, kwargs: self.unet_calls.append({"sample": args[0], **kwargs}), with_kwargs=True)

    def training_step(self, batch, step):
        self.batches.append(batch)
        return super().training_step(batch, step)


def sdxl_oracle(model):
    from diffusers import StableDiffusionXLPipeline

    pipeline = StableDiffusionXLPipeline.from_pretrained(model, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


# ---- SDXL: conditioning and previews --------------------------------------------------------------------------
@pytest.mark.parametrize("text_encoder", ["cached", "trained"])
def test_sdxl_training_conditioning_equals_diffusers(tmp_path, models, bucket_data, text_encoder):
    """Frozen encoders go through the text-encoder cache; trained ones encode every step (with their adapters,
    which start as the identity)."""
    task = RecordingTask()
    config = image_config(tmp_path / "run", models["sdxl"], bucket_data, dataset=BUCKET_DATASET,
                          network={"train_text_encoder": text_encoder == "trained"},
                          training={"max_steps": 1, "batch_size": 2})
    assert train(config, task=task)["status"] == "finished"
    captions, call = task.batches[0]["captions"], task.unet_calls[0]

    oracle = sdxl_oracle(models["sdxl"])
    with torch.no_grad():
        hidden, _, pooled, _ = oracle.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False)
    geometry = {caption: ids for _, caption, ids in BUCKET_IMAGES.values()}
    projection_dim = oracle.text_encoder_2.config.projection_dim
    time_ids = torch.cat([oracle._get_add_time_ids(*geometry[caption], dtype=torch.float32,
                                                   text_encoder_projection_dim=projection_dim) for caption in captions])
    assert torch.equal(call["encoder_hidden_states"], hidden)
    assert torch.equal(call["added_cond_kwargs"]["text_embeds"], pooled)
    assert torch.equal(call["added_cond_kwargs"]["time_ids"], time_ids)


@pytest.mark.parametrize("zeros_for_empty_prompt", [True, False])
def test_sdxl_previews_equal_diffusers(tmp_path, models, demo_data, zeros_for_empty_prompt):
    """Previews call the diffusers pipeline itself; what could differ is around it: the sampler built from the
    training noise schedule, the VAE decode done outside the pipeline, and the empty negative prompt, which must
    mean diffusers' default (None: zeros when the model's ``force_zeros_for_empty_prompt`` says so, as SDXL base
    does; else the encoded empty text), not an encoded "" always. The step-0 preview shows the base model
    (LoRA starts as the identity), so it must equal diffusers' image pixel for pixel."""
    from diffusers import EulerAncestralDiscreteScheduler

    model = shutil.copytree(models["sdxl"], tmp_path / "model")
    index = model / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()),
                                 "force_zeros_for_empty_prompt": zeros_for_empty_prompt}))
    settings = {"prompt": "lyco, red circle", "seed": 5, "steps": 3, "cfg": 5.0, "width": 48, "height": 32}
    prompts = [settings, {**settings, "negative_prompt": "blurry, lowres"}]
    config = image_config(tmp_path / "run", model, demo_data, training={"max_steps": 1},
                          sample={"prompts": prompts, "at_start": True, "sampler": "euler_a"})
    assert train(config)["status"] == "finished"
    preview = events(tmp_path / "run", "preview")[0]
    ours = [np.asarray(Image.open(tmp_path / "run" / path)) for path in preview["images"]]

    oracle = sdxl_oracle(model)
    oracle.scheduler = EulerAncestralDiscreteScheduler.from_config(oracle.scheduler.config)

    def render(negative_prompt):
        image = oracle(prompt=settings["prompt"], negative_prompt=negative_prompt,
                       num_inference_steps=settings["steps"], guidance_scale=settings["cfg"],
                       width=settings["width"], height=settings["height"],
                       generator=torch.Generator().manual_seed(settings["seed"])).images[0]
        return np.asarray(image)

    assert np.array_equal(ours[0], render(None))
    assert np.array_equal(ours[1], render("blurry, lowres"))
    # the distinction is visible on this model: an encoded "" gives another image exactly when zeros are forced
    assert np.array_equal(ours[0], render("")) is not zeros_for_empty_prompt


# ---- SDXL: learning -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("component", ["unet", "te"])
def test_sdxl_loss_falls(tmp_path, models, demo_data, component):
    task = DiffusionTask()
    first, last = learning_run(tmp_path / "run", models["sdxl"], demo_data, "lora", component, task=task)
    assert last < SDXL_MARGIN[component] * first, f"SDXL {component}: loss {first:.4f} -> {last:.4f}"
    if component == "te":  # both encoders learned (their LoRA up matrices start at zero)
        state = task.adapters.state_dict()
        for prefix in ("lora_te1_", "lora_te2_"):
            ups = [value for key, value in state.items() if key.startswith(prefix) and "lora_up" in key]
            assert ups and any(up.abs().max() > 0 for up in ups), f"{prefix} did not learn"


@pytest.mark.parametrize("component", ["unet", "te"])
def test_sdxl_disconnected_adapter_fails_the_margin(tmp_path, models, demo_data, component):
    first, last = learning_run(tmp_path / "run", models["sdxl"], demo_data, "lora", component, task=DisconnectedTask())
    assert last >= SDXL_MARGIN[component] * first and last == pytest.approx(first, rel=1e-4)


# ---- v-prediction ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_v_prediction_target_is_diffusers_velocity(tmp_path, models, bucket_data, zero_terminal_snr):
    """One batch at the last timestep and a middle one: the UNet sees diffusers' noised latents and is trained
    towards v = alpha_t * noise - sigma_t * x0, with alpha_t, sigma_t from the model's noise schedule (rescaled
    to zero terminal SNR when asked: then the last step's input is pure noise and its target is -x0)."""
    from diffusers import DDPMScheduler

    timesteps = torch.tensor([999, 400])

    class Recording(RecordingTask):
        def _latents(self, batch):
            self.x0 = super()._latents(batch)
            return self.x0

        def _noise_and_timesteps(self, latents, paths):
            self.noise = super()._noise_and_timesteps(latents, paths)[0]
            return self.noise, timesteps

        def _elementwise_loss(self, prediction, target):
            self.target = target
            return super()._elementwise_loss(prediction, target)

    task = Recording()
    config = image_config(tmp_path / "run", models["v"], bucket_data, dataset=BUCKET_DATASET,
                          training={"max_steps": 1, "batch_size": 2, "zero_terminal_snr": zero_terminal_snr})
    assert train(config, task=task)["status"] == "finished"
    assert task.prediction_type == "v_prediction"  # from the model's scheduler ("auto")

    oracle = DDPMScheduler.from_pretrained(models["v"] / "scheduler", rescale_betas_zero_snr=zero_terminal_snr)
    x0, noise = task.x0, task.noise
    torch.testing.assert_close(task.unet_calls[0]["sample"], oracle.add_noise(x0, noise, timesteps))
    torch.testing.assert_close(task.target, oracle.get_velocity(x0, noise, timesteps))
    alpha_bar = oracle.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    torch.testing.assert_close(task.target, alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * x0)
    assert bool(oracle.alphas_cumprod[-1] == 0) is zero_terminal_snr
    if zero_terminal_snr:
        torch.testing.assert_close(task.unet_calls[0]["sample"][0], noise[0])
        torch.testing.assert_close(task.target[0], -x0[0])


@pytest.mark.parametrize("zero_terminal_snr", [False, True])
def test_v_prediction_loss_falls(tmp_path, models, demo_data, zero_terminal_snr):
    first, last = learning_run(tmp_path / "run", models["v"], demo_data, "lora", "unet",
                               training={"zero_terminal_snr": zero_terminal_snr})
    assert last < V_MARGIN * first, f"v-prediction: loss {first:.4f} -> {last:.4f}"


def test_v_prediction_disconnected_adapter_fails_the_margin(tmp_path, models, demo_data):
    first, last = learning_run(tmp_path / "run", models["v"], demo_data, "lora", "unet", task=DisconnectedTask(),
                               training={"zero_terminal_snr": True})
    assert last >= V_MARGIN * first and last == pytest.approx(first, rel=1e-4)


@pytest.mark.parametrize("sampler", ["euler", "euler_a", "dpmpp_2m", "ddim", "unipc"])
def test_zero_terminal_snr_previews_start_from_the_last_timestep(models, sampler):
    """Trailing spacing: the first preview step is timestep 999, the pure noise a zero-SNR model starts from."""
    from diffusers import DDPMScheduler

    from lycotrain.diffusion.sampling import make_sampler

    schedule = DDPMScheduler.from_pretrained(models["v"] / "scheduler", rescale_betas_zero_snr=True)
    preview = make_sampler(sampler, schedule.config)
    preview.set_timesteps(4)
    assert int(preview.timesteps[0]) == schedule.config.num_train_timesteps - 1
    plain = make_sampler(sampler, DDPMScheduler.from_pretrained(models["v"] / "scheduler").config)
    plain.set_timesteps(4)
    assert int(plain.timesteps[0]) < schedule.config.num_train_timesteps - 1  # "leading", as the model ships


def test_zero_terminal_snr_on_an_epsilon_model_is_refused(tmp_path, demo_data):
    from lycotrain.diffusion.models import build_tiny_pipeline

    model = build_tiny_pipeline(tmp_path / "eps", arch="sd1")
    result = train(image_config(tmp_path / "run", model, demo_data, training={"zero_terminal_snr": True}))
    assert result["status"] == "failed"
    assert "training.zero_terminal_snr" in result["message"] and "v_prediction" in result["message"]
