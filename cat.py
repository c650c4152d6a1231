"""CAT stub: shared data-format helpers (the full file is being written)."""
import json, os, sys
import numpy as np
import torch

DEFAULT_DATA = 'data/imagenet256'
DATA_FORMAT_VERSION = 1
DEFAULT_VAE = 'stabilityai/sd-vae-ft-ema'


def load_vae(name_or_path=DEFAULT_VAE, device='cpu'):
    """SD-VAE (diffusers AutoencoderKL) from a hub name or a local save_pretrained directory, frozen, eval mode.
    Offline with no cached weights: one clear error."""
    from diffusers.models import AutoencoderKL
    try:
        vae = AutoencoderKL.from_pretrained(name_or_path)
    except Exception as e:  # hub unreachable / not cached / bad path
        raise SystemExit(f"error: cannot load the VAE '{name_or_path}' ({type(e).__name__}). Download it once with network "
                         f"access (it is cached by huggingface_hub) or pass a local save_pretrained directory with --vae.")
    return vae.to(device).eval().requires_grad_(False)
