"""The `model` section for Wan policies (`model.kind: wan | wan_causal`). Light: no diffusers import here.

The architecture comes from the model directory (`model.path`, diffusers format); this section says which clip
the run generates, how the causal model streams it, and how it is trained. Sizes are pixels for `frames`,
`height`, `width` (what the VAE decodes: Wan needs 4k + 1 frames; a pixel-space model without a VAE takes any)
and latent frames for `chunk`, `window`, `sink` (Self-Forcing counts its attention window the same way: the
current chunk included).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class LoraConfig(BaseModel):
    """LoRA adapters on the transformer (peft). flow_grpo trains Wan2.1 with r = 32, alpha = 64 on attention."""

    model_config = ConfigDict(extra="forbid")

    rank: int = Field(32, gt=0)
    alpha: float = Field(64.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"], min_length=1)


class RandomInit(BaseModel):
    """A random model `videorl model init` would write (policy.wan.init presets), made on first use."""

    model_config = ConfigDict(extra="forbid")

    preset: Literal["shapes", "tiny", "wan2.1-1.3b"] = "shapes"
    seed: int = 0


class WanConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["wan", "wan_causal"]
    path: str | None = Field(None, description="diffusers-format directory: transformer/ (+ vae/, text_encoder/, "
                                               "tokenizer/); required unless `init` says how to make it")
    init: RandomInit | None = Field(None, description="when model.path does not exist (or is not given: a folder in "
                                                      "the cache), write this random model there first")
    checkpoint: str | None = Field(None, description="a Self-Forcing / CausVid generator .pt whose weights replace "
                                                     "the transformer's (generator_ema, strict key check)")
    use_ema: bool = Field(True, description="with `checkpoint`: load generator_ema (True) or generator")
    dtype: Literal["float32", "bfloat16", "float64"] = Field(
        "float32", description="transformer weights; SDE steps and log-probs stay float32 (float64 for checks)")
    frames: int = Field(81, ge=1, description="pixel frames of a training clip (4k + 1 with a Wan VAE)")
    height: int = Field(480, ge=1)
    width: int = Field(832, ge=1)
    chunk: int | None = Field(None, ge=1, description="wan_causal: latent frames per chunk (Self-Forcing: 3)")
    window: int | None = Field(None, ge=1, description="wan_causal: latent frames a chunk attends to, itself "
                                                       "included (None: the whole clip)")
    sink: int = Field(0, ge=0, description="wan_causal: first latent frames kept in the cache forever")
    text_len: int = Field(512, ge=1, description="text-encoder states are zero-padded to this many tokens (Wan: 512)")
    lora: LoraConfig | None = None
    gradient_checkpointing: bool = Field(False, description="recompute transformer blocks in backward (learner)")
    attention_backend: str | None = Field(None, description="diffusers attention backend: native, flex, flash, "
                                                            "sage, ... (None: diffusers' default)")

    @model_validator(mode="after")
    def _check(self) -> WanConfig:
        if self.kind == "wan":
            for name in ("chunk", "window"):
                if getattr(self, name) is not None:
                    raise ValueError(f"model.{name} applies to kind wan_causal only (kind wan attends over the whole clip)")
            if self.sink:
                raise ValueError("model.sink applies to kind wan_causal only (kind wan attends over the whole clip)")
        if not self.use_ema and not self.checkpoint:
            raise ValueError("model.use_ema=false applies with model.checkpoint (a Self-Forcing generator) only")
        if self.kind == "wan_causal":
            if self.chunk is None:
                self.chunk = 3
            if self.window is not None and self.window < self.chunk + self.sink:
                raise ValueError(f"model.window ({self.window}) must be >= chunk + sink ({self.chunk} + {self.sink}): "
                                 "the window counts the chunk itself")
        return self
