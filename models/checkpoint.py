"""Loading and saving BTD checkpoints: the authors' published layouts and our own models.

A checkpoint is untrusted input: it is always read with ``torch.load(weights_only=True)``, so a file
that needs code to unpickle is refused, never executed. What is accepted:

- the library's Trainer dict ``{'step', 'model', 'version', ...}`` (``ema`` used when asked for),
- a bare GaussianDiffusion state_dict (13 schedule buffers + ``model.``-prefixed U-Net weights),
- a bare U-Net state_dict.

Which code computes it is decided from the keys and, when saved, the library ``version``:
1.5.4-1.6.x -> our "1.6.4" layout; 1.8.x -> "1.8.3". Version 1.7.x has the 1.6.4 keys but computes
differently, so it is refused rather than silently computed as 1.6.4; 1.9+ (``mem_kv``) and 2.x
(RMSNorm in the ResNet blocks) are refused with what was found. The configuration (dim, dim_mults,
channels) is inferred from the weight shapes, and every shape is checked before loading.
"""

from __future__ import annotations

import hashlib
import pickle
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

import models
from models.diffusion import SCHEDULE_BUFFERS, GaussianDiffusion, make_betas
from models.metadata import (
    METADATA_FORMAT,
    MetadataError,
    ModelMetadata,
    metadata_path_for,
    published_defaults,
)
from models.unet import Unet

SUPPORTED = (
    "supported: denoising-diffusion-pytorch 1.5.4-1.6.x checkpoints (1.6.4 layout), 1.8.x (1.8.3 layout) "
    "and btd's own models"
)
SAVE_VERSION = "1.6.4"


class CheckpointError(ValueError):
    """A checkpoint btd refuses to load; the message says what was found and what is supported."""


@dataclass(frozen=True)
class ModelConfig:
    """The architecture, as inferred from the weights."""

    dim: int
    dim_mults: tuple[int, ...]
    channels: int
    image_size: int
    timesteps: int
    beta_schedule: str = "sigmoid"
    full_attn: tuple[bool, ...] | None = None
    attn_heads: int = 4
    attn_dim_head: int = 32

    def to_dict(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "dim_mults": list(self.dim_mults),
            "channels": self.channels,
            "image_size": self.image_size,
            "timesteps": self.timesteps,
            "beta_schedule": self.beta_schedule,
            "attn_heads": self.attn_heads,
            "attn_dim_head": self.attn_dim_head,
        }


@dataclass
class LoadedModel:
    """A ready-to-use model (``diffusion`` in eval mode) and what is known about it."""

    diffusion: GaussianDiffusion
    layout: str
    version: str | None
    config: ModelConfig
    n_params: int
    metadata: ModelMetadata | None
    weights_sha256: str
    path: Path | None = None
    source: str = ""  # "trainer", "trainer-ema", "diffusion" or "unet": what the file held
    metadata_from_file: bool = False

    def info(self) -> dict[str, Any]:
        """Plain-data description (for `btd model info --json` and logs)."""
        return {
            "path": str(self.path) if self.path else None,
            "layout": self.layout,
            "version": self.version,
            "source": self.source,
            "config": self.config.to_dict(),
            "n_params": self.n_params,
            "weights_sha256": self.weights_sha256,
            "metadata_from_file": self.metadata_from_file,
            "metadata": self.metadata.to_dict() if self.metadata else None,
        }


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# --- reading the file --------------------------------------------------------------------------------
def _unpickler_reason(exc: BaseException) -> str:
    """The useful line of torch's long weights-only message (which global it refused)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if "Unsupported" in line or "WeightsUnpickler error" in line:
            return line
    return lines[0] if lines else type(exc).__name__


def _read_untrusted(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    with open(path, "rb") as handle:
        head = handle.read(4)
    # torch.save writes a zip archive; files from torch < 1.6 are a bare pickle (protocol 2+ starts 0x80).
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x80")):
        raise CheckpointError(f"{path}: not a PyTorch checkpoint (starts with {head!r}); {SUPPORTED}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{path}: refused: loading it would need to run code (it pickles objects other than tensors and "
            f"plain containers), which btd never does for a checkpoint ({_unpickler_reason(exc)}); {SUPPORTED}"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise CheckpointError(
            f"{path}: unreadable as a PyTorch checkpoint (truncated or corrupt): {type(exc).__name__} {reason}"
        ) from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj)


def _extract_state(obj: Any, use_ema: bool, path: Path) -> tuple[dict[str, torch.Tensor], str | None, str]:
    """(state_dict, saved version, source) from whatever the file holds."""
    if not _is_state_dict(obj):
        raise CheckpointError(f"{path}: expected a dict of weights, found {type(obj).__name__}; {SUPPORTED}")
    version = obj.get("version") if isinstance(obj.get("version"), str) else None
    if isinstance(obj.get("model"), dict):
        if use_ema:
            ema = obj.get("ema")
            if not isinstance(ema, dict):
                raise CheckpointError(f"{path}: --ema asked for, but the checkpoint has no 'ema' weights")
            state = {k[len("ema_model.") :]: v for k, v in ema.items() if k.startswith("ema_model.")}
            if not state:
                raise CheckpointError(f"{path}: the 'ema' entry holds no 'ema_model.' weights")
            return state, version, "trainer-ema"
        return obj["model"], version, "trainer"
    if use_ema:
        raise CheckpointError(f"{path}: --ema asked for, but this is a bare state_dict without EMA weights")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path}: a dict without tensors (keys: {', '.join(list(obj)[:8])}); {SUPPORTED}")
    source = "diffusion" if any(k.startswith("model.") for k in tensors) else "unet"
    return tensors, version, source


# --- recognising the layout --------------------------------------------------------------------------
def _parse_version(version: str) -> tuple[int, int, int] | None:
    match = re.match(r"^\s*v?(\d+)\.(\d+)(?:\.(\d+))?", version)
    if not match:
        return None
    return int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)


def _layout_from_version(version: str, path: Path) -> str:
    parsed = _parse_version(version)
    if parsed is None:
        raise CheckpointError(f"{path}: unrecognised library version {version!r}; {SUPPORTED}")
    major, minor, patch = parsed
    if (major, minor) == (1, 7):
        raise CheckpointError(
            f"{path}: saved by denoising-diffusion-pytorch {version}: 1.7.x has the 1.6.4 keys but computes "
            f"differently, and btd does not implement 1.7.x; refusing rather than computing it as 1.6.4. "
            f"{SUPPORTED}"
        )
    if (1, 5, 4) <= (major, minor, patch) < (1, 7, 0):
        return "1.6.4"
    if (major, minor) == (1, 8):
        return "1.8.3"
    raise CheckpointError(
        f"{path}: saved by denoising-diffusion-pytorch {version}, which btd does not read; {SUPPORTED}"
    )


def _layout_from_keys(unet_state: dict[str, torch.Tensor], path: Path) -> str:
    unet_keys = set(unet_state)
    # 2.x is checked first: it also carries mem_kv, but "2.x" is the more useful thing to tell the user.
    rms_blocks = sorted(k for k in unet_keys if re.search(r"block[12]\.norm\.(g|gamma)$", k))
    if rms_blocks:
        raise CheckpointError(
            f"{path}: found RMSNorm in the ResNet blocks ({rms_blocks[0]}) instead of GroupNorm: this is "
            f"denoising-diffusion-pytorch 2.x; {SUPPORTED}"
        )
    mem_kv = sorted(k for k in unet_keys if "mem_kv" in k)
    if mem_kv:
        raise CheckpointError(
            f"{path}: found attention memory key/values ({mem_kv[0]}, {len(mem_kv)} such tensors): this is "
            f"denoising-diffusion-pytorch 1.9 or later; {SUPPORTED}"
        )
    odd_gains = [
        f"{k} {tuple(v.shape)}"
        for k, v in unet_state.items()
        if re.search(r"\.(g|gamma)$", k) and (v.ndim != 4 or v.shape[0] != 1 or v.shape[2:] != (1, 1))
    ]
    if odd_gains:
        raise CheckpointError(
            f"{path}: norm gains shaped unlike 1.6.4/1.8.x ({odd_gains[0]}; expected (1, C, 1, 1)), as in "
            f"denoising-diffusion-pytorch 2.x; {SUPPORTED}"
        )
    if "mid_attn.fn.fn.to_qkv.weight" in unet_keys:
        return "1.6.4"
    if "mid_attn.to_qkv.weight" in unet_keys and "mid_attn.norm.g" in unet_keys:
        return "1.8.3"
    if "init_conv.weight" not in unet_keys:
        sample = ", ".join(sorted(unet_keys)[:5])
        raise CheckpointError(f"{path}: no U-Net weights recognised (keys start: {sample}); {SUPPORTED}")
    raise CheckpointError(f"{path}: a U-Net whose middle attention matches no known layout; {SUPPORTED}")


def _shape(state: dict[str, torch.Tensor], key: str, path: Path) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{path}: missing weight {key!r}; {SUPPORTED}")
    return tuple(state[key].shape)


def _infer_unet(state: dict[str, torch.Tensor], layout: str, path: Path) -> tuple[int, tuple[int, ...], int, tuple]:
    """(dim, dim_mults, channels, full_attn) from the weight shapes."""
    init = _shape(state, "init_conv.weight", path)
    if len(init) != 4:
        raise CheckpointError(f"{path}: init_conv.weight has shape {init}, expected a 4-d conv kernel")
    dim, channels = init[0], init[1]
    stages = sorted({int(m.group(1)) for k in state if (m := re.match(r"^downs\.(\d+)\.", k))})
    if not stages or stages != list(range(len(stages))):
        raise CheckpointError(f"{path}: cannot find the U-Net's down stages (downs.N.*); {SUPPORTED}")
    mults = []
    full_attn = []
    for stage in stages:
        last = stage == stages[-1]
        key = f"downs.{stage}.3.weight" if last else f"downs.{stage}.3.1.weight"
        out_channels = _shape(state, key, path)[0]
        if out_channels % dim:
            raise CheckpointError(f"{path}: stage {stage} has {out_channels} channels, not a multiple of dim {dim}")
        mults.append(out_channels // dim)
        full_attn.append(f"downs.{stage}.2.to_out.weight" in state)
    final = _shape(state, "final_conv.weight", path)
    if final[0] != channels:
        raise CheckpointError(
            f"{path}: the U-Net outputs {final[0]} channels for {channels} input channels (learned variance or "
            f"self-conditioning), which BTD does not use; {SUPPORTED}"
        )
    return dim, tuple(mults), channels, tuple(full_attn) if layout == "1.8.3" else None


def _infer_attention(
    state: dict[str, torch.Tensor], layout: str, metadata: ModelMetadata | None, path: Path
) -> tuple[int, int]:
    """(heads, dim_head). The weights only show heads * dim_head, so the split comes from the metadata;
    without metadata the library's default of 4 heads is assumed (32 per head in the published models)."""
    key = "mid_attn.fn.fn.to_qkv.weight" if layout == "1.6.4" else "mid_attn.to_qkv.weight"
    rows = _shape(state, key, path)[0]
    if rows % 3:
        raise CheckpointError(f"{path}: {key} has {rows} rows, not q, k and v of equal size")
    hidden = rows // 3
    claims = metadata.unet if metadata is not None else {}
    heads = int(claims.get("attn_heads", 4))
    if "attn_dim_head" in claims:
        dim_head = int(claims["attn_dim_head"])
    elif hidden % heads == 0:
        dim_head = hidden // heads
    else:
        raise CheckpointError(f"{path}: attention width {hidden} does not split into {heads} heads")
    if heads * dim_head != hidden:
        raise CheckpointError(
            f"{metadata_path_for(path)}: says {heads} attention heads of {dim_head} but the weights have {hidden}"
        )
    return heads, dim_head


def _detect_schedule(betas: torch.Tensor) -> str:
    timesteps = betas.shape[0]
    for name in ("sigmoid", "linear", "cosine"):
        if torch.allclose(make_betas(name, timesteps).float(), betas.float(), rtol=1e-4, atol=1e-7):
            return name
    return "custom"


def _check_finite(state: dict[str, torch.Tensor], path: Path) -> None:
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"{path}: weight {key!r} holds NaN or infinite values; refusing to score with it")


def _compare_shapes(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], path: Path) -> None:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    wrong = [
        f"{k} {tuple(given[k].shape)} (expected {tuple(expected[k].shape)})"
        for k in sorted(set(expected) & set(given))
        if tuple(given[k].shape) != tuple(expected[k].shape)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} with wrong shapes (e.g. {'; '.join(wrong[:3])})")
    if problems:
        raise CheckpointError(f"{path}: weights do not fit the inferred architecture: {'; '.join(problems)}")


def _read_metadata(path: Path) -> ModelMetadata | None:
    sidecar = metadata_path_for(path)
    if not sidecar.exists():
        return None
    try:
        return ModelMetadata.read(sidecar)
    except (OSError, MetadataError) as exc:
        raise CheckpointError(f"{sidecar}: model metadata unusable: {exc}") from None


def load_model(path: str | Path, use_ema: bool = False, modality: str | None = None) -> LoadedModel:
    """Load a checkpoint safely and build the diffusion model that computes it; see the module docstring.

    ``modality`` picks the published defaults ("CT" or "MR") for a checkpoint without a metadata file;
    a metadata file beside the checkpoint always wins.
    """
    path = Path(path)
    obj = _read_untrusted(path)
    state, version, source = _extract_state(obj, use_ema, path)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{path}: entries that are not tensors in the weights: {', '.join(bad[:5])}")
    if "model." + "init_conv.weight" in state:
        unet_state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        others = {k: v for k, v in state.items() if not k.startswith("model.")}
    else:
        unet_state, others = dict(state), {}
        buffers_here = [k for k in unet_state if k in SCHEDULE_BUFFERS]
        for key in buffers_here:
            others[key] = unet_state.pop(key)

    key_layout = _layout_from_keys(unet_state, path)
    layout = key_layout
    if version is not None:
        layout = _layout_from_version(version, path)
        if layout != key_layout:
            raise CheckpointError(
                f"{path}: says denoising-diffusion-pytorch {version} ({layout} layout) but its keys are in the "
                f"{key_layout} layout; refusing an inconsistent checkpoint"
            )
    _check_finite(state, path)
    dim, dim_mults, channels, full_attn = _infer_unet(unet_state, layout, path)

    metadata_from_file = True
    metadata = _read_metadata(path)
    timesteps = int(others["betas"].shape[0]) if "betas" in others else (metadata.timesteps if metadata else 1000)
    if "betas" in others:
        beta_schedule = _detect_schedule(others["betas"])
    else:
        beta_schedule = metadata.beta_schedule if metadata else "sigmoid"
    if metadata is None:
        metadata_from_file = False
        metadata = published_defaults(
            path.stem,
            modality or "CT",
            unet={"dim": dim, "dim_mults": list(dim_mults), "layout": layout},
            channels=channels,
        )
    _check_metadata_agrees(metadata, dim, dim_mults, channels, layout, path)
    heads, dim_head = _infer_attention(unet_state, layout, metadata if metadata_from_file else None, path)

    try:
        unet = Unet(
            dim=dim,
            dim_mults=dim_mults,
            channels=channels,
            layout=layout,
            full_attn=full_attn,
            attn_heads=heads,
            attn_dim_head=dim_head,
        )
        diffusion = GaussianDiffusion(
            unet,
            image_size=metadata.patch_size,
            timesteps=timesteps,
            beta_schedule=beta_schedule if beta_schedule != "custom" else "sigmoid",
        )
    except (ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: cannot build a U-Net for dim={dim}, dim_mults={dim_mults}: {exc}") from None

    _compare_shapes(unet.state_dict(), unet_state, path)
    unexpected_buffers = sorted(set(others) - set(SCHEDULE_BUFFERS))
    if unexpected_buffers:
        raise CheckpointError(f"{path}: unexpected entries beside the U-Net: {', '.join(unexpected_buffers[:5])}")
    if others:
        _compare_shapes({k: v for k, v in diffusion.state_dict().items() if k in SCHEDULE_BUFFERS}, others, path)
    unet.load_state_dict(unet_state, strict=True)
    if others:
        diffusion.load_state_dict({**others, **{f"model.{k}": v for k, v in unet_state.items()}}, strict=True)
    diffusion.beta_schedule = beta_schedule
    diffusion.eval()

    weights_sha256 = sha256_file(path)
    if metadata_from_file and metadata.weights_sha256 and metadata.weights_sha256 != weights_sha256:
        raise CheckpointError(
            f"{metadata_path_for(path)}: written for other weights (weights_sha256 {metadata.weights_sha256[:12]}... "
            f"but {path.name} hashes to {weights_sha256[:12]}...); its calibration would not apply"
        )
    return LoadedModel(
        diffusion=diffusion,
        layout=layout,
        version=version,
        config=ModelConfig(
            dim, dim_mults, channels, metadata.patch_size, timesteps, beta_schedule, full_attn, heads, dim_head
        ),
        n_params=sum(p.numel() for p in unet.parameters()),
        metadata=metadata,
        weights_sha256=weights_sha256,
        path=path,
        source=source,
        metadata_from_file=metadata_from_file,
    )


def _check_metadata_agrees(
    metadata: ModelMetadata, dim: int, dim_mults: tuple[int, ...], channels: int, layout: str, path: Path
) -> None:
    """A metadata file describing another architecture means the two files were mixed up."""
    claims = metadata.unet or {}
    found = {"dim": dim, "dim_mults": list(dim_mults), "layout": layout}
    for key, value in found.items():
        if key in claims and (list(claims[key]) if key == "dim_mults" else claims[key]) != value:
            raise CheckpointError(
                f"{metadata_path_for(path)}: says unet {key}={claims[key]!r} but the weights have {value!r}"
            )
    if metadata.channels != channels:
        raise CheckpointError(
            f"{metadata_path_for(path)}: says {metadata.channels} channels but the weights take {channels}"
        )


def save_model(
    diffusion: GaussianDiffusion, path: str | Path, metadata: ModelMetadata | dict[str, Any], step: int = 0
) -> ModelMetadata:
    """Write ``NAME.pt`` as the library's Trainer would (1.6.4 layout) and ``NAME.json`` beside it.

    Why 1.6.4: it is the layout the BTD authors' training code embeds, so their tools read our models.
    ``metadata`` may be a ModelMetadata or a plain dict of its fields. Returns the metadata as written
    (architecture fields, software version and weights_sha256 filled in from the model and the file).
    """
    path = Path(path)
    if isinstance(metadata, dict):
        metadata = ModelMetadata.from_dict({"format": METADATA_FORMAT, **metadata})
    unet = diffusion.model
    if getattr(unet, "layout", None) != SAVE_VERSION:
        raise ValueError(f"btd saves models in the {SAVE_VERSION} layout only; this U-Net is {unet.layout!r}")
    state = {key: value.detach().to("cpu").clone() for key, value in diffusion.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"step": int(step), "model": state, "version": SAVE_VERSION}, tmp)
    tmp.replace(path)
    written = replace(
        metadata,
        channels=unet.channels,
        unet={
            **metadata.unet,
            "dim": unet.dim,
            "dim_mults": list(unet.dim_mults),
            "layout": unet.layout,
            "attn_heads": unet.attn_heads,
            "attn_dim_head": unet.attn_dim_head,
        },
        timesteps=diffusion.num_timesteps,
        beta_schedule=diffusion.beta_schedule,
        software_version=metadata.software_version or f"btd {models.__version__}",
        weights_sha256=sha256_file(path),
    )
    written.write(metadata_path_for(path))
    return written
