"""VideoAlign-style VLM reward (VideoReward) on transformers 5: Qwen2-VL / Qwen2.5-VL + a head on three tokens.

The model (`VideoAlignRewardModel`): a Qwen2-VL or Qwen2.5-VL reads the video and a rubric prompt; each
dimension's rubric ends with its own special token (<|VQ_reward|>, <|MQ_reward|>, <|TA_reward|>). The last
hidden state at those tokens goes through `rm_head` (Linear(hidden, 3, bias=False)); dimension d is output d
read at token d (VideoAlign's `view(B, 3, 3).diagonal()`), so r = [VQ, MQ, TA] per video, unitless logits.

Video input, torch only (torchvision does not import beside the CPU torch wheel, ../shared/REAL_MODELS.md §5.2):
frames sampled at `fps` (or a fixed count), rounded to a multiple of the temporal patch (2); each frame resized
(bicubic, antialiased) to multiples of patch·merge (28 px) within [min_pixels, max_pixels] keeping the aspect
ratio; scaled to [0, 1], CLIP mean/std; patchified to [t·h·w, 3·2·14·14] with grid (T/2, H/14, W/14) in the
order Qwen's PatchEmbed and PatchMerger expect. `mm_token_type_ids` marks video tokens 2, text 0 (M-RoPE needs
it in transformers 5).

Checkpoints (VideoAlign's layout, OLD key names from transformers 4.45):
- full: `model.pth`, the whole state dict (`visual.*`, `model.*`, `lm_head.*`, `rm_head.*`);
- LoRA: `adapter_model.safetensors` + `adapter_config.json` (peft, keys `base_model.model.<old name>`) and
  `non_lora_state_dict.pth` (rm_head, trained embeddings, ...), on top of base weights in Hugging Face format;
plus the HF `config.json` and tokenizer, and VideoAlign's `model_config.json` (frame sampling in `data_config`,
normalisation stats `VQ_mean`, `VQ_std`, ... in `inference_config`). Weights may sit in the directory or in its
newest `checkpoint-<step>/` subdirectory. Old names map to transformers 5 as `^visual -> model.visual`,
`^model(?!\\.(language_model|visual)) -> model.language_model`; loading is strict (a missing or unexpected key is a
ValueError naming the first few) and uses `torch.load(weights_only=True)`.

Astrolabe's aggregators (`aggregate`): "vq_top_frames" scores VQ on every sampled frame alone and keeps the mean
of the best 30 % (`rewards.aggregators.top_fraction_mean`); "mq_grayscale" scores MQ on the BT.601 luma of the
clip (`rewards.aggregators.to_grayscale`), so colour cannot move it. "astrolabe" = both.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rewards.aggregators import to_grayscale, top_fraction_mean
from rewards.errors import DataError, check_scores

DIMS = ("vq", "mq", "ta")
REWARD_TOKENS = {"vq": "<|VQ_reward|>", "mq": "<|MQ_reward|>", "ta": "<|TA_reward|>"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
AGGREGATES = ("vq_top_frames", "mq_grayscale")
PEFT_PREFIX = "base_model.model."

# Our own wording of VideoAlign's rubric prompt: each dimension's special token right after its rubric.
RUBRIC = (
    "You judge a video made by a text-to-video model from this prompt: \" {prompt} \" . "
    "Rate it on three criteria . "
    "Visual quality : sharp , clean frames with stable colours and no artefacts . {vq} "
    "Motion quality : smooth , steady and physically plausible movement . {mq} "
    "Text alignment : the objects , colours , directions and speeds the prompt asks for . {ta}"
)
CHAT = "<|im_start|>user\n{vision_start}{video}{vision_end}{text}<|im_end|>\n<|im_start|>assistant\n"

_OLD_TO_NEW = ((re.compile(r"^visual"), "model.visual"),
               (re.compile(r"^model(?!\.(language_model|visual))"), "model.language_model"))
_NEW_TO_OLD = ((re.compile(r"^model\.visual"), "visual"), (re.compile(r"^model\.language_model"), "model"))


# ---------------------------------------------------------------- frames -> patches

@dataclass(frozen=True)
class FrameSampling:
    """How a clip becomes the VLM's video input.

    fps: frames sampled per second of video (None = every frame); num_frames: a fixed count instead (not both).
    video_fps: the frame rate of incoming clips (the world renders 8 frames per second of motion).
    min_pixels, max_pixels: per-frame pixel budget after resizing (VideoAlign: max_frame_pixels = 448·448).
    The default min (56·56) upsamples the world's 16×16 frames to 56×56: a (2, 2) grid of merged tokens.
    """

    fps: float | None = None
    num_frames: int | None = None
    video_fps: float = 8.0
    min_pixels: int = 56 * 56
    max_pixels: int = 448 * 448

    def __post_init__(self) -> None:
        if self.fps is not None and self.num_frames is not None:
            raise ValueError("FrameSampling: set fps or num_frames, not both")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"FrameSampling: fps must be > 0, got {self.fps}")
        if self.num_frames is not None and self.num_frames < 1:
            raise ValueError(f"FrameSampling: num_frames must be >= 1, got {self.num_frames}")
        if not self.video_fps > 0:
            raise ValueError(f"FrameSampling: video_fps must be > 0, got {self.video_fps}")
        if not 0 < self.min_pixels <= self.max_pixels:
            raise ValueError(f"FrameSampling: need 0 < min_pixels <= max_pixels, got {self.min_pixels}, "
                             f"{self.max_pixels}")


def frame_indices(num_in: int, sampling: FrameSampling, multiple: int = 2) -> np.ndarray:
    """Indices of the frames kept from a clip of `num_in` frames: evenly spaced, the count a multiple of
    `multiple` (the temporal patch) and at least one multiple; short clips repeat frames."""
    if num_in < 1:
        raise ValueError(f"a clip needs at least one frame, got {num_in}")
    if sampling.num_frames is not None:
        n = sampling.num_frames
    elif sampling.fps is not None:
        n = num_in / sampling.video_fps * sampling.fps
    else:
        n = num_in
    n = max(multiple, int(round(n / multiple)) * multiple)
    return np.linspace(0, num_in - 1, n).round().astype(np.int64)


def frame_size(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """(H', W'): multiples of `factor`, about the input's aspect ratio, with min_pixels <= H'·W' <= max_pixels
    where a multiple of factor allows it (Qwen-VL's resize rule)."""
    if max_pixels < factor * factor:
        raise ValueError(f"max_pixels {max_pixels} is below one {factor}x{factor} patch")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def patchify(frames: torch.Tensor, patch: int, temporal_patch: int, merge: int) -> tuple[torch.Tensor, tuple]:
    """frames float [T, C, H, W] (normalised; T % temporal_patch == 0, H and W multiples of patch·merge)
    -> (patches [t·h·w, C·temporal_patch·patch·patch], grid (t, h, w)) with t = T/temporal_patch, h = H/patch,
    w = W/patch. Patches are ordered merge-window by merge-window (PatchMerger joins merge² neighbours) and each
    flattens (C, temporal_patch, patch, patch), the layout of Qwen-VL's Conv3d patch embedding."""
    T, C, H, W = frames.shape
    if T % temporal_patch or H % (patch * merge) or W % (patch * merge):
        raise ValueError(f"patchify: [T={T}, C, H={H}, W={W}] must be multiples of ({temporal_patch}, "
                         f"{patch * merge}, {patch * merge})")
    t, h, w = T // temporal_patch, H // patch, W // patch
    x = frames.reshape(t, temporal_patch, C, h // merge, merge, patch, w // merge, merge, patch)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)  # t, h/m, w/m, m, m | C, tp, p, p
    return x.reshape(t * h * w, C * temporal_patch * patch * patch), (t, h, w)


def video_patches(video, sampling: FrameSampling, vision_config, grayscale: bool = False,
                  frame: int | None = None) -> tuple[torch.Tensor, tuple, float]:
    """One clip uint8 [T, H, W, 3] (or float in [0, 1]) -> (patches float32 [L, 3·tp·p·p], grid (t, h, w),
    sampled fps). grayscale: BT.601 luma in all three channels. frame: score only sampled frame `frame`
    (repeated to fill one temporal patch, as Qwen-VL treats an image)."""
    v = torch.as_tensor(np.asarray(video))
    x = v.float() if v.dtype == torch.uint8 else v.float() * 255.0
    idx = frame_indices(x.shape[0], sampling, vision_config.temporal_patch_size)
    fps = len(idx) / (x.shape[0] / sampling.video_fps)
    x = x[torch.from_numpy(idx)]
    if frame is not None:
        x = x[frame:frame + 1].expand(vision_config.temporal_patch_size, -1, -1, -1)
    if grayscale:
        x = to_grayscale(x)[..., None].expand(-1, -1, -1, 3)
    x = x.permute(0, 3, 1, 2)  # [T, 3, H, W]
    factor = vision_config.patch_size * vision_config.spatial_merge_size
    size = frame_size(x.shape[2], x.shape[3], factor, sampling.min_pixels, sampling.max_pixels)
    if size != tuple(x.shape[2:]):
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp(0.0, 255.0)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    x = (x / 255.0 - mean) / std
    patches, grid = patchify(x, vision_config.patch_size, vision_config.temporal_patch_size,
                             vision_config.spatial_merge_size)
    return patches, grid, fps


def reward_prompt(prompt: str, rubric: str = RUBRIC) -> str:
    """The rubric text for one prompt, each dimension's special token after its rubric."""
    return rubric.format(prompt=prompt, **REWARD_TOKENS)


def check_rubric(rubric: str) -> str:
    """A rubric template must hold {prompt} and each reward token's field once: {vq}, {mq}, {ta}."""
    for field in ("{prompt}", *(f"{{{d}}}" for d in DIMS)):
        if rubric.count(field) != 1:
            raise ValueError(f"rubric template must contain {field} exactly once")
    return rubric


# ---------------------------------------------------------------- the model

class VideoAlignRewardModel(nn.Module):
    """A Qwen2-VL / Qwen2.5-VL (`vlm`, optionally a peft LoRA model) + `rm_head` read at the reward tokens.

    Invariant: every encoded sequence holds each reward token exactly once, after all video tokens, so with
    causal attention and right padding a video's rewards do not depend on the rest of its batch.
    `forward(...)` -> [B, 3] float (VQ, MQ, TA logits); `score(videos, prompts)` builds the inputs.
    `normalization`: {dim: (mean, std)} from the checkpoint's model_config.json, or None (applied by the scorer).
    `rubric`: the prompt template (`RUBRIC`, our wording); a checkpoint trained with another text scores best with
    that text, {prompt} and {vq} / {mq} / {ta} (the reward tokens) in it.
    """

    def __init__(self, vlm: nn.Module, tokenizer, sampling: FrameSampling = FrameSampling(),
                 normalization: dict[str, tuple[float, float]] | None = None, rubric: str = RUBRIC):
        super().__init__()
        self.vlm = vlm
        config = self.config
        self.rm_head = nn.Linear(config.text_config.hidden_size, len(DIMS), bias=False)
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.normalization = normalization
        self.rubric = check_rubric(rubric)
        self.reward_token_ids = []
        for d in DIMS:
            tid = tokenizer.convert_tokens_to_ids(REWARD_TOKENS[d])
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"the tokenizer has no {REWARD_TOKENS[d]} token")
            self.reward_token_ids.append(int(tid))
        for name in ("video_token_id", "vision_start_token_id", "vision_end_token_id"):
            tid = getattr(config, name)
            if tid is None or not 0 <= tid < config.text_config.vocab_size:
                raise ValueError(f"config.{name} = {tid} is outside the vocabulary")
        self._markers = {k: tokenizer.convert_ids_to_tokens(getattr(config, f"{k}_token_id"))
                         for k in ("video", "vision_start", "vision_end")}

    @property
    def config(self):
        return self.base_vlm.config

    @property
    def base_vlm(self) -> nn.Module:
        """The Qwen*ForConditionalGeneration inside (under peft's wrappers when LoRA is applied)."""
        return self.vlm.get_base_model() if hasattr(self.vlm, "get_base_model") else self.vlm

    @property
    def device(self) -> torch.device:
        return self.rm_head.weight.device

    def encode(self, videos, prompts: list[str], *, grayscale: bool = False,
               frame: int | None = None) -> dict[str, torch.Tensor]:
        """Model inputs for N clips (each uint8 [T, H, W, 3]; sizes may differ) and N prompts, right-padded."""
        vcfg = self.config.vision_config
        merge2 = vcfg.spatial_merge_size ** 2
        patches, grids, seconds, texts = [], [], [], []
        for video, prompt in zip(videos, prompts):
            p, grid, fps = video_patches(video, self.sampling, vcfg, grayscale, frame)
            patches.append(p)
            grids.append(grid)
            seconds.append(vcfg.temporal_patch_size / fps)
            n_tokens = grid[0] * grid[1] * grid[2] // merge2
            texts.append(CHAT.format(vision_start=self._markers["vision_start"],
                                     video=self._markers["video"] * n_tokens, vision_end=self._markers["vision_end"],
                                     text=reward_prompt(prompt, self.rubric)))
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        length = max(len(i) for i in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), length), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), length), dtype=torch.long)
        for row, seq in enumerate(ids):
            input_ids[row, :len(seq)] = torch.tensor(seq)
            mask[row, :len(seq)] = 1
        out = {"input_ids": input_ids, "attention_mask": mask, "pixel_values_videos": torch.cat(patches),
               "video_grid_thw": torch.tensor(grids, dtype=torch.long)}
        if self.config.model_type == "qwen2_5_vl":  # M-RoPE's time axis in seconds per temporal patch
            out["second_per_grid_ts"] = torch.tensor(seconds, dtype=torch.float32)
        return {k: v.to(self.device) for k, v in out.items()}

    def reward_positions(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[B, 3] position of each dimension's reward token; exactly one of each per row, else ValueError."""
        found = torch.stack([input_ids == t for t in self.reward_token_ids], dim=1)  # [B, 3, L]
        counts = found.sum(-1)
        if (counts != 1).any():
            row, d = (counts != 1).nonzero()[0].tolist()
            raise ValueError(f"sequence {row} holds {REWARD_TOKENS[DIMS[d]]} {counts[row, d].item()} times, "
                             f"expected once")
        return found.int().argmax(-1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values_videos: torch.Tensor,
                video_grid_thw: torch.Tensor, second_per_grid_ts: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 3] rewards: rm_head(h[b, position of token d])[d], h the VLM's last hidden state."""
        extra = {} if second_per_grid_ts is None else {"second_per_grid_ts": second_per_grid_ts}
        hidden = self.base_vlm.model(
            input_ids=input_ids, attention_mask=attention_mask, pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw, mm_token_type_ids=(input_ids == self.config.video_token_id).int() * 2,
            use_cache=False, **extra).last_hidden_state  # [B, L, hidden]
        pos = self.reward_positions(input_ids)  # [B, 3]
        at_tokens = hidden.gather(1, pos[..., None].expand(-1, -1, hidden.shape[-1]))  # [B, 3, hidden]
        logits = self.rm_head(at_tokens.to(self.rm_head.weight.dtype))  # [B, 3 tokens, 3 outputs]
        return logits.diagonal(dim1=1, dim2=2)

    def score(self, videos, prompts: list[str], *, grayscale: bool = False, frame: int | None = None) -> torch.Tensor:
        """[N, 3] rewards of N clips (gradients flow; wrap in torch.no_grad() to score)."""
        return self(**self.encode(videos, prompts, grayscale=grayscale, frame=frame))

    def frame_scores(self, videos, prompts: list[str]) -> torch.Tensor:
        """[N, T', 3]: each of the T' sampled frames scored alone (all clips must sample the same T')."""
        counts = {len(frame_indices(len(v), self.sampling, self.config.vision_config.temporal_patch_size))
                  for v in videos}
        if len(counts) != 1:
            raise ValueError(f"frame_scores: clips sample different frame counts {sorted(counts)}")
        return torch.stack([self.score(videos, prompts, frame=f) for f in range(counts.pop())], dim=1)


# ---------------------------------------------------------------- checkpoints

def old_to_new_key(key: str) -> str:
    """A transformers-4.45 Qwen-VL key (VideoAlign's checkpoints) -> its transformers 5 name."""
    for pattern, repl in _OLD_TO_NEW:
        key, n = pattern.subn(repl, key)
        if n:
            break
    return key


def new_to_old_key(key: str) -> str:
    for pattern, repl in _NEW_TO_OLD:
        key, n = pattern.subn(repl, key)
        if n:
            break
    return key


def _strip_peft(key: str) -> str:
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def _check_keys(where: Path, missing, unexpected) -> None:
    """Strict loading: name the first few missing / unexpected keys (in VideoAlign's old names)."""
    problems = []
    for what, keys in (("missing", sorted(missing)), ("unexpected", sorted(unexpected))):
        if keys:
            shown = ", ".join(new_to_old_key(k) for k in keys[:5])
            problems.append(f"{len(keys)} {what} key{'s' if len(keys) > 1 else ''}: {shown}"
                            + (", ..." if len(keys) > 5 else ""))
    if problems:
        raise ValueError(f"{where}: checkpoint does not match the model: " + "; ".join(problems))


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: expected a state dict of tensors")
    return state


def _weights_dir(path: Path) -> Path:
    """The directory holding model.pth or the adapter: `path` itself or its newest checkpoint-<step>/."""
    if (path / "model.pth").is_file() or (path / "adapter_model.safetensors").is_file():
        return path
    steps = sorted((int(m.group(1)), p) for p in path.glob("checkpoint-*")
                   if p.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", p.name)))
    if not steps:
        raise FileNotFoundError(f"{path}: no VideoAlign checkpoint (model.pth, adapter_model.safetensors or "
                                f"checkpoint-<step>/)")
    return steps[-1][1]


def read_model_config(path: Path) -> dict:
    """VideoAlign's model_config.json ({} when absent)."""
    file = Path(path) / "model_config.json"
    if not file.is_file():
        return {}
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not JSON ({e})") from None


def normalization_stats(model_config: dict) -> dict[str, tuple[float, float]] | None:
    """{dim: (mean, std)} from `inference_config` (VideoAlign) or the top level; None when absent."""
    source = model_config.get("inference_config") or model_config
    keys = [f"{d.upper()}_{s}" for d in DIMS for s in ("mean", "std")]
    present = [k for k in keys if k in source]
    if not present:
        return None
    if len(present) != len(keys):
        raise ValueError(f"model_config.json: normalisation needs {keys}, has only {present}")
    stats = {d: (float(source[f"{d.upper()}_mean"]), float(source[f"{d.upper()}_std"])) for d in DIMS}
    if not all(s > 0 and math.isfinite(m) for m, s in stats.values()):
        raise ValueError(f"model_config.json: normalisation stds must be > 0 and means finite, got {stats}")
    return stats


def sampling_from_config(model_config: dict) -> FrameSampling:
    data = model_config.get("data_config") or {}
    kw = {k: data[src] for k, src in (("fps", "fps"), ("num_frames", "num_frames"), ("video_fps", "video_fps"),
                                      ("min_pixels", "min_frame_pixels"), ("max_pixels", "max_frame_pixels"))
          if data.get(src) is not None}
    if "fps" in kw and "num_frames" in kw:
        kw.pop("fps")  # VideoAlign: num_frames wins when both are set
    return FrameSampling(**kw)


def _vlm_class(config):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    classes = {"qwen2_vl": Qwen2VLForConditionalGeneration, "qwen2_5_vl": Qwen2_5_VLForConditionalGeneration}
    if config.model_type not in classes:
        raise ValueError(f"VideoAlign reward needs a qwen2_vl or qwen2_5_vl config, got {config.model_type!r}")
    return classes[config.model_type]


def _tokenizer(dirs: list) -> object:
    from transformers import AutoTokenizer

    for d in dirs:
        if d is not None and Path(d).is_dir() and any((Path(d) / f).is_file()
                                                      for f in ("tokenizer.json", "tokenizer_config.json")):
            tok = AutoTokenizer.from_pretrained(d)
            break
    else:
        raise FileNotFoundError(f"no tokenizer in {[str(d) for d in dirs if d is not None]}")
    missing = [t for t in REWARD_TOKENS.values() if t not in tok.get_vocab()]
    if missing:  # VideoAlign adds its reward tokens to the base tokenizer at load time
        tok.add_special_tokens({"additional_special_tokens": missing})
    return tok


def _allowed_missing(vlm) -> set[str]:
    return {"lm_head.weight"} if getattr(vlm.config, "tie_word_embeddings", False) else set()


def _resize_for(vlm, state: dict[str, torch.Tensor], tokenizer) -> None:
    """Grow / shrink the embeddings to the checkpoint's row count (VideoAlign resized for its reward tokens), or
    to fit the reward tokens when the checkpoint has no embeddings."""
    rows = state.get("model.language_model.embed_tokens.weight")
    n = rows.shape[0] if rows is not None else None
    top = max(tokenizer.convert_tokens_to_ids(t) for t in REWARD_TOKENS.values()) + 1
    if n is None and top > vlm.get_input_embeddings().weight.shape[0]:
        n = top
    if n is not None and n != vlm.get_input_embeddings().weight.shape[0]:
        vlm.resize_token_embeddings(n)


def _load_into(model: VideoAlignRewardModel, state: dict[str, torch.Tensor], where: Path,
               required_absent_ok: set[str] | None = None, partial: bool = False) -> None:
    """Copy `state` (new names) into the VLM / rm_head. partial=False: every key of the model must be there."""
    own = {**{k: v for k, v in model.vlm.state_dict().items()}, **{f"rm_head.{k}": v for k, v in
                                                                   model.rm_head.state_dict().items()}}
    unexpected = [k for k in state if k not in own]
    missing = [] if partial else [k for k in own if k not in state and k not in (required_absent_ok or set())]
    _check_keys(where, missing, unexpected)
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{where}: {new_to_old_key(k)} has shape {tuple(v.shape)}, the model needs "
                             f"{tuple(own[k].shape)}")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)


def load_videoalign(checkpoint: str | Path, *, base: str | Path | None = None, device: str | None = None,
                    dtype: torch.dtype = torch.float32, merge_lora: bool = True) -> VideoAlignRewardModel:
    """A VideoAlign checkpoint directory (full `model.pth` or LoRA, see the module docstring) -> an eval-mode
    `VideoAlignRewardModel` on `device` (None: cuda when visible, else cpu) in `dtype`.

    The HF config and tokenizer come from the weights directory, the checkpoint directory or `base`, in that
    order. LoRA base weights (a Hugging Face model directory or hub id): `base`, else model_config.json's
    `model_config.model_name_or_path` (relative to the checkpoint when such a directory is there).
    merge_lora folds the adapter into the base weights.
    Raises FileNotFoundError for a directory without a checkpoint, ValueError for key or shape mismatches.
    """
    from transformers import AutoConfig

    path = Path(checkpoint)
    if not path.is_dir():
        raise FileNotFoundError(f"VideoAlign checkpoint directory not found: {path}")
    wdir = _weights_dir(path)
    meta = read_model_config(path) or read_model_config(wdir)
    lora = not (wdir / "model.pth").is_file()
    if lora and base is None:
        base = (meta.get("model_config") or {}).get("model_name_or_path")
        if base is None:
            raise FileNotFoundError(f"{wdir}: LoRA checkpoint without base weights (model_config.json names no "
                                    f"model_name_or_path); pass base=")
        if (path / base).is_dir():  # relative to the checkpoint, as save_videoalign_checkpoint writes it
            base = path / base
    dirs = [wdir, path, base]
    config_dir = next((d for d in dirs if d is not None and (Path(d) / "config.json").is_file()), base)
    if config_dir is None:
        raise FileNotFoundError(f"{path}: no config.json (pass base=)")
    config = AutoConfig.from_pretrained(config_dir)
    cls = _vlm_class(config)
    tokenizer = _tokenizer(dirs)
    sampling, norm = sampling_from_config(meta), normalization_stats(meta)
    if not lora:
        from transformers.initialization import no_init_weights

        state = {old_to_new_key(k): v for k, v in _torch_load(wdir / "model.pth").items()}
        with no_init_weights():  # every weight comes from model.pth
            vlm = cls(config)
        _resize_for(vlm, state, tokenizer)
        model = VideoAlignRewardModel(vlm, tokenizer, sampling, norm)
        _load_into(model, state, wdir / "model.pth", _allowed_missing(vlm))
        if _allowed_missing(vlm):
            vlm.tie_weights()
    else:
        model = _load_lora(cls, base, wdir, tokenizer, sampling, norm, merge_lora)
    return model.to(device=_device(device), dtype=dtype).eval()


def _load_lora(cls, base, wdir: Path, tokenizer, sampling, norm, merge: bool) -> VideoAlignRewardModel:
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    for name in ("adapter_model.safetensors", "adapter_config.json", "non_lora_state_dict.pth"):
        if not (wdir / name).is_file():
            raise FileNotFoundError(f"{wdir}: LoRA checkpoint lacks {name}")
    try:
        vlm, info = cls.from_pretrained(base, output_loading_info=True, dtype=torch.float32)
    except OSError as e:  # transformers' "not a local folder and not a model id": one line naming the key, no traceback
        raise FileNotFoundError(f"{wdir}: the LoRA checkpoint's base weights {str(base)!r} cannot be loaded "
                                f"({type(e).__name__}); set `base:` to the base model's directory") from None
    _check_keys(Path(str(base)), set(info["missing_keys"]) - _allowed_missing(vlm), info["unexpected_keys"])
    non_lora = {old_to_new_key(_strip_peft(k)): v for k, v in _torch_load(wdir / "non_lora_state_dict.pth").items()}
    if "rm_head.weight" not in non_lora:
        _check_keys(wdir / "non_lora_state_dict.pth", ["rm_head.weight"], [])
    _resize_for(vlm, non_lora, tokenizer)
    model = VideoAlignRewardModel(get_peft_model(vlm, LoraConfig.from_pretrained(wdir)), tokenizer, sampling, norm)
    # adapter: peft saves `base_model.model.<old name>.lora_A.weight`; ours is `...lora_A.default.weight`
    own = model.vlm.state_dict()
    adapter = {}
    for k, v in load_file(wdir / "adapter_model.safetensors").items():
        key = PEFT_PREFIX + old_to_new_key(_strip_peft(k))
        adapter[re.sub(r"\.(lora_[AB]|lora_embedding_[AB]|lora_magnitude_vector)\.", r".\1.default.", key)] = v
    wanted = [k for k in own if ".lora_" in k]
    _check_keys(wdir / "adapter_model.safetensors", [k for k in wanted if k not in adapter],
                [k for k in adapter if k not in own])
    # non-LoRA tensors: weights of a LoRA-wrapped layer live under `.base_layer`
    state = {}
    for k, v in non_lora.items():
        if k.startswith("rm_head."):
            state[k] = v
            continue
        key = PEFT_PREFIX + k
        if key not in own:
            key = re.sub(r"\.(weight|bias)$", r".base_layer.\1", key)
        state[key if key in own else PEFT_PREFIX + k] = v
    _load_into(model, {**adapter, **state}, wdir, partial=True)
    if merge:
        model.vlm = model.vlm.merge_and_unload()
    return model


def _device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def _old_state(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + new_to_old_key(k): v.detach().cpu().clone().contiguous() for k, v in state.items()}


def save_videoalign_checkpoint(model: VideoAlignRewardModel, out_dir: str | Path, *,
                               normalization: dict[str, tuple[float, float]] | None = None,
                               base_name: str | None = None) -> Path:
    """Write `model` in VideoAlign's layout with OLD key names (what the loader reads back).

    Full model: `model.pth`. A peft LoRA model: `adapter_model.safetensors` + `adapter_config.json`,
    `non_lora_state_dict.pth` (rm_head and the token embeddings, `base_model.model.` prefix) and the base
    weights in `base/` (`model.safetensors` with old names, transformers renames them on load; model_config.json
    names it as the model_name_or_path). Always: HF `config.json`,
    the tokenizer and `model_config.json` (data_config = the model's frame sampling; inference_config = the
    normalisation stats when given, else the model's own).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    base_vlm = model.base_vlm
    base_vlm.config.save_pretrained(out)
    model.tokenizer.save_pretrained(out)
    tied = _allowed_missing(base_vlm)
    head = {f"rm_head.{k}": v for k, v in model.rm_head.state_dict().items()}
    peft_config = None
    if hasattr(model.vlm, "peft_config"):
        from peft import get_peft_model_state_dict

        peft_config = model.vlm.peft_config["default"]
        adapter = {PEFT_PREFIX + new_to_old_key(_strip_peft(k)): v.detach().cpu().contiguous()
                   for k, v in get_peft_model_state_dict(model.vlm).items()}
        save_file(adapter, out / "adapter_model.safetensors")
        peft_config.save_pretrained(out)
        base = {}
        for k, v in model.vlm.state_dict().items():
            if ".lora_" not in k:
                base[_strip_peft(k).replace(".base_layer.", ".")] = v
        embed = "model.language_model.embed_tokens.weight"
        torch.save(_old_state({**head, embed: base[embed]}, PEFT_PREFIX), out / "non_lora_state_dict.pth")
        # the base in its own directory: transformers would load an adapter_config.json beside it by itself
        (out / "base").mkdir(exist_ok=True)
        base_vlm.config.save_pretrained(out / "base")
        save_file(_old_state({k: v for k, v in base.items() if k not in tied}), out / "base" / "model.safetensors",
                  metadata={"format": "pt"})
        base_name = "base"
    else:
        torch.save(_old_state({**model.vlm.state_dict(), **head}), out / "model.pth")
    stats = normalization if normalization is not None else model.normalization
    s = model.sampling
    meta = {"data_config": {"fps": s.fps, "num_frames": s.num_frames, "video_fps": s.video_fps,
                            "min_frame_pixels": s.min_pixels, "max_frame_pixels": s.max_pixels,
                            "eval_dim": [d.upper() for d in DIMS], "prompt_template_type": "videorl_rubric"},
            "model_config": {"model_name_or_path": base_name or getattr(base_vlm.config, "_name_or_path", None) or None,
                             "output_dim": len(DIMS), "reward_token": "special",
                             "special_tokens": [REWARD_TOKENS[d] for d in DIMS]},
            "peft_lora_config": None if peft_config is None else {
                "lora_r": peft_config.r, "lora_alpha": peft_config.lora_alpha,
                "lora_target_modules": sorted(peft_config.target_modules or [])}}
    if stats is not None:
        meta["inference_config"] = {f"{d.upper()}_{n}": float(x) for d in DIMS
                                    for n, x in zip(("mean", "std"), stats[d])}
    (out / "model_config.json").write_text(json.dumps(meta, indent=2))
    return out


# ---------------------------------------------------------------- a tiny random model (tests, CPU)

TINY_TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=0, bos_token_id=1, eos_token_id=3,
                 rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})  # sections sum to head_dim / 2
TINY_IDS = dict(image_token_id=500, video_token_id=501, vision_start_token_id=502, vision_end_token_id=503)
TINY_VISION = {
    "qwen2_vl": dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                     temporal_patch_size=2),
    "qwen2_5_vl": dict(depth=1, hidden_size=32, out_hidden_size=64, intermediate_size=64, num_heads=2,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                       fullatt_block_indexes=[0]),
}


def tiny_tokenizer():
    """A word-level tokenizer built offline: the rubric's and the world's words, Qwen's chat/vision markers at
    Qwen-like ids (video pad 501 as in TINY_IDS) and the three reward tokens; unknown words -> <unk>."""
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rewards.world import VOCAB

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", *REWARD_TOKENS.values()]
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for w, _ in pre.pre_tokenize_str(RUBRIC.format(prompt="", vq="", mq="", ta=""))}
                   | set(VOCAB) | {"user", "assistant"})
    vocab = {t: i for i, t in enumerate([*specials, *words])}
    markers = {"<|image_pad|>": 500, "<|video_pad|>": 501, "<|vision_start|>": 502, "<|vision_end|>": 503}
    if len(vocab) > 500:
        raise ValueError(f"tiny vocabulary has {len(vocab)} words, room for 500")
    vocab.update(markers)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre
    tok.add_special_tokens([AddedToken(t, special=True) for t in [*specials, *markers]])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>")


def build_tiny_vlm(kind: Literal["qwen2_vl", "qwen2_5_vl"] = "qwen2_vl", seed: int = 0):
    """A random Qwen2-VL (0.22 M parameters) or Qwen2.5-VL from ../shared/REAL_MODELS.md §5.2's config."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    if kind not in TINY_VISION:
        raise ValueError(f"kind must be one of {list(TINY_VISION)}, got {kind!r}")
    cfg_cls, cls = ((Qwen2VLConfig, Qwen2VLForConditionalGeneration) if kind == "qwen2_vl"
                    else (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration))
    config = cfg_cls(text_config=TINY_TEXT, vision_config=TINY_VISION[kind], tie_word_embeddings=True, **TINY_IDS)
    torch.manual_seed(seed)
    return cls(config).eval()


def build_tiny_videoalign(out_dir: str | Path | None = None, seed: int = 0,
                          kind: Literal["qwen2_vl", "qwen2_5_vl"] = "qwen2_vl",
                          sampling: FrameSampling = FrameSampling(max_pixels=56 * 56)) -> VideoAlignRewardModel:
    """A tiny random VideoAlign reward model (nothing downloaded); written to `out_dir` in VideoAlign's full
    layout (`save_videoalign_checkpoint`) when given. rm_head is drawn at the scale of a trained head
    (std 1 / sqrt(hidden)) so the three dimensions' scores differ visibly."""
    model = VideoAlignRewardModel(build_tiny_vlm(kind, seed), tiny_tokenizer(), sampling)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(seed + 1)
        w = model.rm_head.weight
        w.copy_(torch.randn(w.shape, generator=generator) / math.sqrt(w.shape[1]))
    model.eval()
    if out_dir is not None:
        save_videoalign_checkpoint(model, out_dir, base_name=f"tiny-random-{kind}")
    return model


def apply_lora(model: VideoAlignRewardModel, rank: int = 8, alpha: float = 16.0,
               target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj"),
               random_b: bool = False) -> VideoAlignRewardModel:
    """Wrap the VLM in a peft LoRA adapter (in place; returns `model`). Only the adapter, rm_head and the
    embeddings stay trainable (VideoAlign trains the reward tokens' rows). random_b: draw B instead of zeros,
    so the adapter changes outputs at once (tests)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules),
                        init_lora_weights=not random_b)
    model.vlm = get_peft_model(model.vlm, config)
    model.base_vlm.get_input_embeddings().weight.requires_grad_(True)
    return model


# ---------------------------------------------------------------- the scorer (reward plug-in contract)

def _parse_aggregate(aggregate) -> tuple[str, ...]:
    if aggregate is None or aggregate == "clip":
        return ()
    if aggregate == "astrolabe":
        return AGGREGATES
    names = (aggregate,) if isinstance(aggregate, str) else tuple(aggregate)
    unknown = [a for a in names if a not in AGGREGATES]
    if unknown:
        raise ValueError(f"unknown aggregate {unknown}; expected 'clip', 'astrolabe' or any of {list(AGGREGATES)}")
    return tuple(a for a in AGGREGATES if a in names)


class VideoAlignScorer:
    """Reward plug-in: a VideoAlign checkpoint scoring {"ids": [N] str, "videos": uint8 [N, T, H, W, 3] (or a
    list of N clips of any size), "prompts": [N] str} -> {"vq", "mq", "ta": float32 [N]} (extra batch keys ignored).

    fps / num_frames / video_fps / max_pixels / min_pixels override the checkpoint's frame sampling
    (model_config.json's data_config, else `FrameSampling`'s defaults). aggregate: "clip" (VideoAlign: one
    forward per clip), "astrolabe", or a list of "vq_top_frames" (VQ = mean of the top `top_fraction` of per-frame
    VQ scores) and "mq_grayscale" (MQ read from a forward on the luma video). normalize: (r - mean) / std per
    dimension with the checkpoint's stats, when it has them. rubric: the prompt template (default `RUBRIC`; see
    `VideoAlignRewardModel`). A bad sample raises DataError naming its id.
    `version` changes with the weights' content and every setting that changes scores.
    """

    dims = DIMS

    def __init__(self, checkpoint: str | Path, *, device: str | None = None, fps: float | None = None,
                 num_frames: int | None = None, video_fps: float | None = None, max_pixels: int | None = None,
                 min_pixels: int | None = None, aggregate="clip", top_fraction: float = 0.3,
                 normalize: bool = True, base: str | Path | None = None, batch_size: int = 8,
                 dtype: str = "float32", rubric: str | None = None):
        from orchestrator.hashing import fingerprint, tree_sha256

        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
        if not 0.0 < top_fraction <= 1.0:
            raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
        self.aggregate = _parse_aggregate(aggregate)
        self.top_fraction = float(top_fraction)
        self.batch_size = batch_size
        self.device = _device(device)
        self.model = load_videoalign(checkpoint, base=base, device=self.device, dtype=getattr(torch, dtype))
        sampling = self.model.sampling
        overrides = {k: v for k, v in (("video_fps", video_fps), ("max_pixels", max_pixels),
                                       ("min_pixels", min_pixels)) if v is not None}
        if fps is not None or num_frames is not None:
            overrides.update(fps=fps, num_frames=num_frames)
        self.model.sampling = replace(sampling, **overrides)
        if rubric is not None:
            self.model.rubric = check_rubric(rubric)
        self.normalization = self.model.normalization if normalize else None
        self.reserved = (*REWARD_TOKENS.values(), *self.model._markers.values())
        self.version = "videoalign-" + fingerprint(tree_sha256(checkpoint), json.dumps(asdict(self.model.sampling)),
                                                   ",".join(self.aggregate), self.top_fraction,
                                                   json.dumps(self.normalization), dtype, self.model.rubric)

    def score(self, batch: dict) -> dict[str, np.ndarray]:
        ids = [str(i) for i in batch["ids"]]
        videos, prompts = batch["videos"], batch["prompts"]
        if isinstance(prompts, str) or len(prompts) != len(ids) or len(videos) != len(ids):
            raise DataError(ids[0] if ids else "?", f"batch has {len(ids)} ids, {len(videos)} videos and "
                                                    f"{len(prompts)} prompts")
        clips = [_check_clip(sid, v) for sid, v in zip(ids, videos)]
        for sid, p in zip(ids, prompts):
            if not isinstance(p, str) or not p.strip():
                raise DataError(sid, f"prompt must be a non-empty string, got {p!r}")
            marker = next((m for m in self.reserved if m in p), None)
            if marker is not None:  # it would break the one-token-per-dimension read-out
                raise DataError(sid, f"prompt contains the model's reserved token {marker}")
        if not ids:
            return {d: np.zeros(0, np.float32) for d in DIMS}
        out = np.concatenate([self._score_chunk(clips[i:i + self.batch_size], list(prompts[i:i + self.batch_size]))
                              for i in range(0, len(ids), self.batch_size)])
        scores = check_scores(out, ids, DIMS)
        return {d: scores[:, j].copy() for j, d in enumerate(DIMS)}

    @torch.no_grad()
    def _score_chunk(self, clips: list[np.ndarray], prompts: list[str]) -> np.ndarray:
        scores = self.model.score(clips, prompts)  # [n, 3]
        if "vq_top_frames" in self.aggregate:
            vq = self.model.frame_scores(clips, prompts)[..., DIMS.index("vq")]  # [n, T']
            scores[:, DIMS.index("vq")] = top_fraction_mean(vq, self.top_fraction)
        if "mq_grayscale" in self.aggregate:
            scores[:, DIMS.index("mq")] = self.model.score(clips, prompts, grayscale=True)[:, DIMS.index("mq")]
        scores = scores.float().cpu().numpy()
        if self.normalization is not None:
            mean = np.array([self.normalization[d][0] for d in DIMS], np.float32)
            std = np.array([self.normalization[d][1] for d in DIMS], np.float32)
            scores = (scores - mean) / std
        return scores


def _check_clip(sid: str, video) -> np.ndarray:
    v = np.asarray(video)
    if v.ndim != 4 or v.shape[-1] != 3 or min(v.shape) < 1:
        raise DataError(sid, f"video shape {v.shape}, expected [T, H, W, 3]")
    if v.dtype != np.uint8:
        if not np.issubdtype(v.dtype, np.floating) or not np.isfinite(v).all() or v.min() < 0 or v.max() > 1:
            raise DataError(sid, f"video must be uint8 or float in [0, 1], got {v.dtype}")
    return v


# ---------------------------------------------------------------- training

def preference_loss(model: VideoAlignRewardModel, pairs, loss: Literal["regression", "bt", "btt"],
                    k: float = 5.0) -> torch.Tensor:
    """Mean loss over a batch of `rewards.reward_model.PreferencePairs` (MATH.md §6, as for VideoReward):
    bt: non-tie entries, -log σ(r_pref - r_other); btt: every entry, Rao–Kupper ties (k);
    regression: MSE of both clips' rewards against the oracle scores score_a / score_b."""
    from rewards.reward_model import pair_loss

    n = len(pairs)
    r = model.score(list(pairs.video_a) + list(pairs.video_b), pairs.prompts + pairs.prompts)
    return pair_loss(r[:n], r[n:], pairs, loss, k)


def train_videoalign(model: VideoAlignRewardModel, pairs, loss: Literal["regression", "bt", "btt"] = "btt", *,
                     steps: int = 100, batch_size: int = 8, lr: float = 1e-4, k: float = 5.0, seed: int = 0,
                     warmup: float = 0.05, weight_decay: float = 0.0, head_only: bool = False,
                     progress: bool = False) -> list[float]:
    """Fine-tune `model` in place on preference pairs; returns the loss per step.

    pairs: `rewards.reward_model.PreferencePairs`, a `rewards.preference.PairSet` (`read_preference_data(dir,
    "train")`) or a dict of their fields: video_a / video_b uint8 [N, T, H, W, 3], prompts [N], labels [N, 3]
    in {+1, 0, -1} for (VQ, MQ, TA), score_a / score_b [N, 3] (regression only).
    Trains every parameter that requires grad (after `apply_lora`: the adapter, rm_head and the embeddings;
    head_only: rm_head alone) with AdamW, `batch_size` random pairs per step (`seed`), learning rate warm-up then
    cosine to 0 (`rewards.reward_model.warmup_cosine`). Losses from `rewards.losses` (k: Rao–Kupper tie parameter).
    """
    from tqdm.auto import tqdm

    from rewards.reward_model import PreferencePairs, warmup_cosine

    if not isinstance(pairs, PreferencePairs):
        names = ("video_a", "video_b", "prompts", "labels", "score_a", "score_b")
        pairs = PreferencePairs(**{n: pairs[n] for n in names if n in pairs.keys()})
    if pairs.labels.shape[1] != len(DIMS):
        raise ValueError(f"labels have {pairs.labels.shape[1]} dimensions, VideoAlign scores {DIMS}")
    if loss not in ("regression", "bt", "btt"):
        raise ValueError(f"loss must be 'regression', 'bt' or 'btt', got {loss!r}")
    if steps < 0 or batch_size < 1 or not lr > 0 or not 0.0 <= warmup < 1.0:
        raise ValueError(f"need steps >= 0, batch_size >= 1, lr > 0, 0 <= warmup < 1; got {steps}, {batch_size}, "
                         f"{lr}, {warmup}")
    params = list(model.rm_head.parameters()) if head_only else [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    history = []
    model.train()
    try:
        for step in tqdm(range(steps), desc=f"videoalign ({loss})", disable=not progress, unit="step"):
            for group in opt.param_groups:
                group["lr"] = lr * warmup_cosine(step, steps, warmup)
            batch = pairs.subset(rng.choice(len(pairs), size=min(batch_size, len(pairs)), replace=False))
            value = preference_loss(model, batch, loss, k)
            opt.zero_grad()
            value.backward()
            opt.step()
            history.append(value.item())
    finally:
        model.eval()
    return history


@torch.no_grad()
def score_differences(model: VideoAlignRewardModel, pairs, batch_size: int = 16) -> np.ndarray:
    """r_a - r_b [N, 3] float64 for every pair (eval mode): what `orchestrator.reward_training`'s benchmark needs."""
    was = model.training
    model.eval()
    try:
        out = []
        for i in range(0, len(pairs.prompts), batch_size):
            sl = slice(i, i + batch_size)
            prompts = list(pairs.prompts[sl])
            out.append((model.score(list(pairs.video_a[sl]), prompts) - model.score(list(pairs.video_b[sl]), prompts))
                       .double().cpu())
    finally:
        model.train(was)
    return torch.cat(out).numpy() if out else np.zeros((0, len(DIMS)))
