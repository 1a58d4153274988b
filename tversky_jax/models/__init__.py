"""Network architectures."""

from tversky_jax.models.unet3d import UNet3D, count_params, required_divisor

__all__ = ["UNet3D", "count_params", "required_divisor"]
