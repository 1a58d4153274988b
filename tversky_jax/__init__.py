"""Tversky loss (Salehi et al. 2017) and a 3D U-Net trainer in JAX/Flax."""
