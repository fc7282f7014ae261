"""Write the published SD1.5 / SD2.1 / SDXL component configs as diffusers-layout folders under
``lycotrain/data/configs/`` (package data for offline single-file loading and for the meta-device tests).

The values are the published architectures (runwayml/stable-diffusion-v1-5, stabilityai/stable-diffusion-2-1
and -2-1-base, stabilityai/stable-diffusion-xl-base-1.0); only fields that differ from the class defaults
of diffusers/transformers matter, but the important ones are spelled out. Run: ``python tools/write_model_configs.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "lycotrain" / "data" / "configs"

SD_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}

CLIP_L = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "vocab_size": 49408,
          "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "max_position_embeddings": 77, "hidden_act": "quick_gelu", "projection_dim": 768,
          "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "layer_norm_eps": 1e-05}
OPENCLIP_H = {**CLIP_L, "hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 23,
              "num_attention_heads": 16, "hidden_act": "gelu", "projection_dim": 512}
OPENCLIP_BIGG = {**CLIP_L, "architectures": ["CLIPTextModelWithProjection"], "hidden_size": 1280,
                 "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
                 "hidden_act": "gelu", "projection_dim": 1280}

SD1_UNET = {"_class_name": "UNet2DConditionModel", "sample_size": 64, "in_channels": 4, "out_channels": 4,
            "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "cross_attention_dim": 768, "attention_head_dim": 8, "norm_num_groups": 32, "use_linear_projection": False,
            "upcast_attention": False}
SD2_UNET = {**SD1_UNET, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
            "use_linear_projection": True}
SDXL_UNET = {**SD1_UNET, "sample_size": 128, "block_out_channels": [320, 640, 1280],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20], "transformer_layers_per_block": [1, 2, 10],
             "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816}

VAE = {"_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
       "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "norm_num_groups": 32,
       "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
       "sample_size": 512, "scaling_factor": 0.18215, "force_upcast": True}


SD_COMPONENTS = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                 "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                 "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
                 "feature_extractor": [None, None], "requires_safety_checker": False}
SDXL_COMPONENTS = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                   "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                   "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                   "tokenizer_2": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DDPMScheduler"]}

FAMILIES = {
    "sd1": ("StableDiffusionPipeline", SD_COMPONENTS, {"unet": SD1_UNET, "vae": VAE, "text_encoder": CLIP_L},
            "epsilon"),
    "sd2": ("StableDiffusionPipeline", SD_COMPONENTS, {"unet": SD2_UNET, "vae": VAE, "text_encoder": OPENCLIP_H},
            "epsilon"),
    "sd2-v": ("StableDiffusionPipeline", SD_COMPONENTS,
              {"unet": {**SD2_UNET, "sample_size": 96, "upcast_attention": True}, "vae": {**VAE, "sample_size": 768},
               "text_encoder": OPENCLIP_H}, "v_prediction"),
    "sdxl": ("StableDiffusionXLPipeline", SDXL_COMPONENTS,
             {"unet": SDXL_UNET, "vae": {**VAE, "sample_size": 1024, "scaling_factor": 0.13025},
              "text_encoder": CLIP_L, "text_encoder_2": OPENCLIP_BIGG}, "epsilon"),
}


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")


def main() -> None:
    for family, (pipeline_cls, components, configs, prediction) in FAMILIES.items():
        folder = ROOT / family
        _write(folder / "model_index.json", {"_class_name": pipeline_cls, **components})
        for name, config in configs.items():
            _write(folder / name / "config.json", config)
        _write(folder / "scheduler" / "scheduler_config.json",
               {"_class_name": "DDPMScheduler", **SD_BETAS, "prediction_type": prediction})


if __name__ == "__main__":
    main()
