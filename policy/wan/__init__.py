"""Wan2.1/2.2 and Self-Forcing-style causal Wan policies on the stock diffusers WanTransformer3DModel."""
