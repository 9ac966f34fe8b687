"""``TextToImage``: the name the evaluation, tools and the embedded teacher sample SD-layout folders by.

It is the SD 1.x/2.x family (``instaflow.models.families.sd.SDFamily``): noise from seeds -> text states ->
the model's solver -> VAE decoding, in chunks. Students and coupling stages hold their family through
``instaflow.models.families.load_family`` instead, so images in TensorBoard, in the quality curves and in the
results table come from one code path.
"""

from __future__ import annotations

from instaflow.models.families.sd import SDFamily, decode_latents

TextToImage = SDFamily

__all__ = ["TextToImage", "decode_latents", "from_modules"]


def from_modules(unet, vae, text_encoder, scheduler_config: dict, kind: str = "ddpm") -> SDFamily:
    """A model of live networks in the SD layout (one UNet, a VAE, one text encoder), e.g. the embedded teacher
    while it trains: the stage that builds it need not name the family class (tests/test_no_family_names.py)."""
    return SDFamily(unet=unet, vae=vae, text_encoder=text_encoder, scheduler_config=scheduler_config, kind=kind)
