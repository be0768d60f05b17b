"""Wan2.1/2.2 and Self-Forcing-style causal Wan policies on the stock diffusers WanTransformer3DModel."""


def __getattr__(name: str):
    """`policy.wan.self_forcing_velocities` (the parity check against upstream Self-Forcing), imported on first use so
    that `policy.wan.config` stays free of diffusers."""
    if name == "self_forcing_velocities":
        from policy.wan.fixture import self_forcing_velocities

        return self_forcing_velocities
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
