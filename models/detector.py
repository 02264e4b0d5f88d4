"""The BTD detector: a model loaded once, scoring whole series slice by slice.

Per slice: modality units -> the model's [0, 1] channels -> [-1, 1] -> one reverse diffusion step at
t = 0 -> residual map (float32, computed from the noise prediction so that a bf16 U-Net cannot erase it)
-> the slice's own anomaly map (`AnomalyModel.slice_map`) -> finished against the adjacent slices of the
series (`AnomalyModel.finish`: a real structure spans several slices, a 2-D edit one) -> regions and a slice
score -> relative to the series (`AnomalyModel.series_offset`, once the whole series is seen: scanners and
patients shift every slice alike, an edit touches a few). A series scores the max of its slices, a study the
max of its series (`models.results.study_verdict`).
Verdicts come only from the calibration stored with the model; an uncalibrated model gives "not assessed",
never a pass.

Streaming: slices are decoded and run through the model a batch at a time; each slice is finished when the
next one is known, so at most three slices' maps are held at once, and results hold only scores and regions.
The next batch's model pass runs while the one before it is finished (models/pass_ahead.py); on the CPU a
pass's slices run on threads of their own (models/row_threads.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import logging
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.allocator import keep_freed_memory
from models.anomaly import AnomalyModel, SliceMap
from models.cues.header import signature
from models.diffusion import GaussianDiffusion
from models.fused import LUNGLESS_SLICE, FusionConfig, SliceCues, fuse_series, slice_cues
from models.merged_passes import MergedPasses
from models.metadata import DEFAULT_MODEL_PATH, ModelMetadata
from models.morphology import dilate
from models.pass_ahead import PassAhead
from models.preprocess import PathOrDataset, open_dataset, to_unit
from models.readahead import read_ahead
from models.reference import Reference, ReferenceKey, ReferenceSet, reference_key
from models.regions import DEFAULT_MAX_REGIONS, find_regions
from models.results import (
    NO_EVIDENCE,
    NOT_ASSESSED,
    REVIEW,
    SUSPICIOUS,
    UNCALIBRATED_REASON,
    InstanceResult,
    ModelInfo,
    SeriesResult,
    verdict_for,
)
from models.row_threads import RowThreads
from models.series import SeriesGroup, SliceRef, adjacent, expand_paths, group_series, iter_slices, usual_spacing
from models.tiling import residual_tiles, residual_whole
from models.windowing import Window, unit_to_model

log = logging.getLogger(__name__)

MODES = ("auto", "tiles", "whole")
PRECISIONS = ("auto", "fp32", "bf16")

OnMap = Callable[[InstanceResult, np.ndarray], None]
Progress = Callable[[int], None]


class DetectorError(RuntimeError):
    """The detector cannot be built (missing default model, bad option); the message says what to do."""


@dataclass
class ScoringOptions:
    """How slices are run through the model; defaults chosen by the measurements in docs/bench/scoring.md."""

    mode: str = "auto"  # auto: tiles for the published weights, whole slice for ours (docs/bench/scoring.md)
    overlap: int | None = None  # tiles: pixels shared by neighbours; None = a quarter of the patch
    # Slices decoded and scored together (and, whole mode, per forward pass; tiles mode runs 8 tiles per
    # slice per pass). None: 2 on CPU, where batching gains nothing and a whole 512 slice of the published
    # size needs +663 MB; 16 on CUDA.
    batch_size: int | None = None
    skip_air: bool = True  # CT: do not run tiles (or the whole-slice crop) outside the body
    # "body", or "search": only where the anomaly model looks (dilated lungs), plus the margin its local
    # filters reach, so that the anomaly map, scores and regions are unchanged (tiles) while less runs.
    # None: "search" for tiles (same map, less work), "body" for the whole slice (whose crop changes the map)
    run_region: str | None = None
    precision: str = "auto"  # auto = bf16 autocast on CUDA, fp32 on CPU
    # Slices decoded ahead on a thread of their own while the model runs (models/readahead.py). None: a
    # batch ahead on CUDA, where the device would otherwise wait for each decode; none on the CPU, where
    # the decode competes with torch's threads for the same cores (measured without gain, scoring.md).
    read_ahead: int | None = None
    max_regions: int = DEFAULT_MAX_REGIONS

    def calibration_key(self) -> dict[str, Any]:
        """What must be the same at calibration and at scoring for the thresholds to apply."""
        return {"mode": self.mode, "overlap": self.overlap, "skip_air": self.skip_air, "run_region": self.run_region}

    def validate(self) -> None:
        if self.mode not in MODES:
            raise DetectorError(f"mode {self.mode!r} unknown; use one of {', '.join(MODES)}")
        if self.precision not in PRECISIONS:
            raise DetectorError(f"precision {self.precision!r} unknown; use one of {', '.join(PRECISIONS)}")
        if self.run_region not in (None, "body", "search"):
            raise DetectorError(f"run_region {self.run_region!r} unknown; use body or search")
        if self.batch_size is not None and self.batch_size < 1:
            raise DetectorError("batch_size must be at least 1")
        if self.read_ahead is not None and self.read_ahead < 0:
            raise DetectorError("read_ahead must be 0 (off) or more")


def auto_mode(metadata: ModelMetadata) -> str:
    """Tiles for the authors' published weights: their own patch grid without overlap, run only where the
    anomaly model searches, which reproduces their patch residuals there (they were trained on 96/128-px
    patches); the whole slice, cropped to the body, for our own models (built for it). Measurements in
    docs/bench/scoring.md."""
    source = str((metadata.training or {}).get("source", ""))
    return "tiles" if source.startswith("published") else "whole"


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise DetectorError(f"device {device!r} requested but CUDA is not available")
    return resolved


class Detector:
    """A BTD model ready to score DICOM series; build it with `Detector.load` (or from a diffusion model)."""

    def __init__(
        self,
        diffusion: GaussianDiffusion,
        metadata: ModelMetadata,
        *,
        device: str | torch.device = "auto",
        weights_sha256: str = "",
        path: Path | None = None,
        options: ScoringOptions | None = None,
        references: ReferenceSet | None = None,
    ) -> None:
        self.options = dataclasses.replace(options) if options else ScoringOptions()  # resolved below: a copy
        self.options.validate()
        if self.options.mode == "auto":
            self.options.mode = auto_mode(metadata)
            if self.options.mode == "tiles" and self.options.overlap is None:
                self.options.overlap = 0  # the published weights: the authors' own patch grid
        if self.options.run_region is None:
            self.options.run_region = "search" if self.options.mode == "tiles" else "body"
        self.device = resolve_device(device)
        keep_freed_memory()  # a scoring process reuses its freed slice buffers (models/allocator.py)
        if self.options.batch_size is None:
            self.options.batch_size = 16 if self.device.type == "cuda" else 2
        if self.options.read_ahead is None:
            self.options.read_ahead = self.options.batch_size if self.device.type == "cuda" else 0
        self.diffusion = diffusion.to(self.device).eval()
        self.metadata = metadata
        # Series scored on threads of their own (a study's, or several studies') share the model's passes:
        # same-shape inputs waiting together run as one batch (models/merged_passes.py).
        # On the CPU each pass's rows then run on threads of their own, one torch thread each (models/row_threads.py).
        rows = self.options.batch_size * (8 if self.options.mode == "tiles" else 1)
        self.row_threads = RowThreads(self._residual_batch_alone)
        self.model_passes = MergedPasses(self.row_threads, rows)
        # A series' next batch goes through the model while the batch before it is finished (models/pass_ahead.py).
        self.pass_ahead = PassAhead()
        self.anomaly = AnomalyModel.from_metadata(metadata.anomaly)
        # Fused cues (issue 12): None for a model whose metadata has no fusion block (the BTD-only scoring).
        self.fusion = FusionConfig.from_metadata(metadata.fusion)
        if self.fusion is not None:
            # One pair of thresholds: a site's `btd calibrate` rewrites calibration.slice/series_threshold on
            # its own (fused) scores, and the fused verdicts follow them.
            calibration = metadata.calibration or {}
            if calibration.get("slice_threshold") is not None:
                self.fusion.review = float(calibration["slice_threshold"])
            if calibration.get("series_threshold") is not None:
                self.fusion.suspicious = float(calibration["series_threshold"])
        # The shipped references per scanner key, then the site's (a site's reference wins for its key).
        self.references = ReferenceSet.from_dict(metadata.references)
        for site_reference in (references.by_key.values() if references else ()):
            self.references.add(site_reference)
        self.windows = [Window.from_dict(w) for w in metadata.windows]
        unet = diffusion.model
        self.info = ModelInfo(
            name=metadata.name,
            version=metadata.software_version,
            weights_sha256=weights_sha256 or metadata.weights_sha256,
            modality=metadata.modality,
            layout=str(getattr(unet, "layout", "")),
            channels=int(unet.channels),
            patch_size=int(metadata.patch_size),
            calibrated=self.slice_threshold is not None,
            path=str(path) if path else None,
        )

    # --- construction ------------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        path: str | Path | None = None,
        device: str | torch.device = "auto",
        use_ema: bool = False,
        references: ReferenceSet | None = None,
        **options: Any,
    ) -> Detector:
        """Load a checkpoint (None = the default CT model shipped in models/weights/) safely."""
        from models.checkpoint import load_model

        model_path = Path(path) if path is not None else DEFAULT_MODEL_PATH
        if not model_path.is_file():
            hint = " (the default CT model has not been trained and shipped yet)" if path is None else ""
            raise DetectorError(f"model file {model_path} not found{hint}; pass --model / BTD_MODEL")
        loaded = load_model(model_path, use_ema=use_ema)
        # The scoring the model was calibrated with is its default: thresholds only hold for it.
        calibrated_with = dict((loaded.metadata.calibration or {}).get("scoring") or {})
        chosen = {k: v for k, v in {**calibrated_with, **options}.items() if v is not None or k == "overlap"}
        unknown = sorted(set(chosen) - set(ScoringOptions.__dataclass_fields__))
        if unknown:
            raise DetectorError(f"unknown scoring options: {', '.join(unknown)}")
        return cls(
            loaded.diffusion,
            loaded.metadata,
            device=device,
            weights_sha256=loaded.weights_sha256,
            path=model_path,
            options=ScoringOptions(**chosen),
            references=references,
        )

    # --- calibration -------------------------------------------------------------------------------
    @property
    def calibration_mismatch(self) -> str | None:
        """Why the stored thresholds do not apply to the chosen scoring options (None when they do)."""
        scoring = (self.metadata.calibration or {}).get("scoring")
        if not scoring:
            return None
        mine = self.options.calibration_key()
        different = [k for k in mine if k in scoring and scoring[k] != mine[k]]
        if not different:
            return None
        return (
            "model calibrated for other scoring options ("
            + ", ".join(f"{k}={scoring[k]!r}, not {mine[k]!r}" for k in different)
            + ")"
        )

    def _threshold(self, key: str) -> float | None:
        value = (self.metadata.calibration or {}).get(key)
        if value is None or self.calibration_mismatch:
            return None
        return float(value)

    @property
    def slice_threshold(self) -> float | None:
        return self._threshold("slice_threshold")

    @property
    def series_threshold(self) -> float | None:
        return self._threshold("series_threshold")

    def uncalibrated_reason(self) -> str:
        return self.calibration_mismatch or UNCALIBRATED_REASON

    # --- the model ---------------------------------------------------------------------------------
    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        precision = self.options.precision
        if precision == "auto":
            precision = "bf16" if self.device.type == "cuda" else "fp32"
        if precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def residual_batch(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> float32 residual; merged with other threads' same-shape inputs."""
        return self.model_passes(x)

    def residual_batches(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Several batches at once (crops of different sizes): on the CPU their rows share the row threads
        (`RowThreads.each`); elsewhere each is a pass of its own, merged with other threads' same-shape inputs."""
        if len(batches) > 1 and all(x.device.type == "cpu" for x in batches):
            return self.row_threads.each(batches)
        return [self.residual_batch(x) for x in batches]

    def _residual_batch_alone(self, x: torch.Tensor) -> torch.Tensor:
        """One model pass: only the U-Net runs under autocast (autocast is per thread: set here)."""
        with torch.inference_mode():
            with self._autocast():
                eps = self.diffusion.predict_noise(x, 0)
            return self.diffusion.btd_residual(x.float(), eps.float())

    def model_input(self, values: np.ndarray) -> np.ndarray:
        """Modality units (H, W) -> (C, H, W) float32 in [-1, 1]."""
        unit = to_unit(values, self.metadata.normalization, self.windows, self.info.channels)
        return unit_to_model(unit).astype(np.float32)

    def body_mask(self, values: np.ndarray) -> np.ndarray | None:
        """Where to run the model: for CT the body (air cannot hide tampering worth flagging) together with
        everything the anomaly model will read (its search region, e.g. the dilated lungs, grown by the reach
        of its local filters), so that no pixel it judges has a residual that was never computed; all of MR.

        run_region="search" drops the rest of the body: the anomaly map, scores and regions are the same.
        """
        if not self.options.skip_air or self.metadata.normalization != "window":
            return None
        search_mask = getattr(self.anomaly, "search_mask", None)
        needed = None
        if search_mask is not None:
            reach = int(getattr(self.anomaly, "smoothing_px", 5)) + int(getattr(self.anomaly, "region_px", 1)) + 2
            needed = dilate(search_mask(values), iterations=reach)
        if self.options.run_region == "search" and needed is not None:
            return needed
        body = self.anomaly.body_mask(values)
        return body if needed is None else body | needed

    def residual_maps(self, slices: list[np.ndarray]) -> list[np.ndarray]:
        """Residual maps (C, H, W) float32 of slices in modality units (H, W), batched."""
        if not slices:
            return []
        inputs = [self.model_input(values) for values in slices]
        masks = [self.body_mask(values) for values in slices]
        opts = self.options
        if opts.mode == "whole":
            multiple = int(self.diffusion.model.downsample_factor)
            # A caller that replaced `residual_batch` (a benchmark answering passes from a record, a probe of
            # another timestep) gets every batch through it, one at a time.
            own_passes = getattr(self.residual_batch, "__func__", None) is Detector.residual_batch
            return residual_whole(
                inputs, masks, self.residual_batch, multiple, opts.batch_size, self.device,
                residual_each=self.residual_batches if own_passes else None,
            )
        patch = int(self.metadata.patch_size)
        overlap = patch // 4 if opts.overlap is None else int(opts.overlap)
        tiles_per_pass = 8 * int(opts.batch_size or 1)
        return residual_tiles(inputs, masks, self.residual_batch, patch, overlap, tiles_per_pass, self.device)

    # --- scoring -----------------------------------------------------------------------------------
    def group(self, paths_or_datasets: Iterable[PathOrDataset]) -> list[SeriesGroup]:
        """Files, folders or Datasets -> series (headers only), in the order first seen."""
        sources = [s for s in paths_or_datasets]
        expanded: list[PathOrDataset] = []
        for source in sources:
            if isinstance(source, str | Path) and Path(source).is_dir():
                expanded.extend(expand_paths([source]))
            else:
                expanded.append(source)
        return group_series(expanded)

    def score_series(
        self,
        paths_or_datasets: Iterable[PathOrDataset],
        on_map: OnMap | None = None,
        progress: Progress | None = None,
        on_flagged: OnMap | None = None,
        reference: Reference | ReferenceSet | None = None,
    ) -> SeriesResult:
        """Score the images of ONE series (unreadable files among them are reported as not assessed).

        on_map: every slice's residual map as the slice is finished (its verdict may be provisional);
        on_flagged: the residual map of each slice whose FINAL verdict is suspicious (for a series-relative
        model, once the series is seen; only among its TOP_MAPS_KEPT highest-scoring slices);
        reference: a site reference (models.reference.Reference) or a set of them, looked up before the
        shipped ones; it only matters for a series too short to be judged against itself (fused models)."""
        groups = self.group(paths_or_datasets)
        if not groups:
            raise ValueError("score_series got no images")
        readable = [g for g in groups if g.modality or g.series_instance_uid]
        if len(readable) > 1:
            uids = ", ".join(g.series_instance_uid or "(blank)" for g in readable)
            raise ValueError(f"score_series got {len(readable)} series ({uids}); use score_paths for several")
        merged = readable[0] if readable else groups[0]
        for extra in groups:
            if extra is not merged:
                merged.slices.extend(extra.slices)
        return self.score_group(merged, on_map=on_map, progress=progress, on_flagged=on_flagged, reference=reference)

    def score_paths(
        self,
        paths: Iterable[PathOrDataset],
        on_map: OnMap | None = None,
        progress: Progress | None = None,
        on_flagged: OnMap | None = None,
        reference: Reference | ReferenceSet | None = None,
    ) -> Iterator[SeriesResult]:
        """Group files and folders into series and yield one SeriesResult per series."""
        for group in self.group(paths):
            yield self.score_group(group, on_map=on_map, progress=progress, on_flagged=on_flagged, reference=reference)

    def score_group(
        self,
        group: SeriesGroup,
        on_map: OnMap | None = None,
        progress: Progress | None = None,
        on_flagged: OnMap | None = None,
        reference: Reference | ReferenceSet | None = None,
    ) -> SeriesResult:
        """Score one series' slices in order, a batch at a time, each against its adjacent slices."""
        header = _SeriesHeader.read(group) if self.fusion else None
        mismatch = None
        if group.modality and group.modality != self.metadata.modality:
            mismatch = f"model {self.info.name} judges {self.metadata.modality}, this series is {group.modality}"
        instances: list[InstanceResult] = []
        pending: list[_Pending] = []
        skip_lungless = self._skips_lungless(on_map)
        kept = _SeriesMaps(TOP_MAPS_KEPT if self.anomaly.series_relative else 0, keep_residuals=on_flagged is not None)
        spacing = slice_spacing(group)
        chain = _NeighbourChain(
            lambda entry, around: self._finish(entry, around, on_map, kept, on_flagged, spacing, header), spacing
        )

        ahead: tuple[list[_Pending], Future[list[np.ndarray]]] | None = None

        def finish(batch: list[_Pending], residuals: Future[list[np.ndarray]]) -> None:
            for entry in self._mapped(batch, residuals.result()):
                instances.extend(chain.push(entry))
            if progress:
                progress(len(batch))

        def flush(drain: bool = False) -> None:
            """Start the pending batch's model pass, finish the batch before it meanwhile; `drain`: finish all."""
            nonlocal ahead
            previous, ahead = ahead, None
            if pending:
                batch = pending.copy()
                pending.clear()
                passes = [values for _, values, needs_pass in batch if needs_pass]
                ahead = (batch, self.pass_ahead.submit(self.residual_maps, passes))
            if previous is not None:
                finish(*previous)
            if drain and ahead is not None:
                last, ahead = ahead, None
                finish(*last)

        for ref, values, reason in read_ahead(iter_slices(group), depth=self.options.read_ahead or 0):
            if mismatch and not reason:
                reason = mismatch
            if reason or values is None:
                flush(drain=True)  # a slice that cannot be judged breaks the chain of neighbours
                instances.extend(chain.close())
                instances.append(_not_assessed(ref, reason or "no pixels"))
                if progress:
                    progress(1)
                continue
            pending.append((ref, values, not (skip_lungless and not self.anomaly.has_lungs(values))))
            # A batch holds `batch_size` model passes; slices without one ride along, a bounded number at a time.
            passes = sum(needs_pass for *_, needs_pass in pending)
            if passes >= (self.options.batch_size or 1) or len(pending) - passes >= _MOST_RIDING:
                flush()
        flush(drain=True)
        instances.extend(chain.close())
        if self.fusion is not None and header is not None:
            return self._fused_result(group, instances, kept, header, reference, on_flagged)
        self._relative_to_series(instances, kept)
        if on_flagged is not None and self.anomaly.series_relative:
            for instance in instances:
                residual = kept.residual_of(instance)
                if instance.verdict == SUSPICIOUS and residual is not None:
                    on_flagged(instance, residual)
        return self._series_result(group, instances)

    def _skips_lungless(self, on_map: OnMap | None) -> bool:
        """Whether a slice without lung may skip its model pass. A fused model's cues judge lung tissue only, so
        such a slice ends up not assessed whatever its residual (models/fused.py); when neighbours' maps are not
        subtracted (neighbour_weight 0, the shipped models) its map feeds no other slice either, and only its
        pixels (the neighbours' continuity cue) are still read. Not with `on_map`, whose caller asked for every
        slice's residual. A chest series that runs into the neck or abdomen saves a pass (~0.3 s of CPU) for
        every such slice; every assessed slice's score is the same."""
        return (
            on_map is None
            and self.fusion is not None
            and self.anomaly.lung_only
            and self.anomaly.neighbour_weight <= 0
        )

    def _mapped(self, batch: list[_Pending], residuals: list[np.ndarray]) -> list[_Mapped]:
        if len(residuals) != sum(needs_pass for *_, needs_pass in batch):
            raise DetectorError(f"{len(residuals)} residual maps for a batch of {len(batch)} slices")
        produced = iter(residuals)
        mapped = []
        for ref, values, needs_pass in batch:
            if not needs_pass:
                mapped.append(_Mapped(ref, None, None, values))
                continue
            residual = next(produced)
            slice_map = self.anomaly.slice_map(residual, values)
            mapped.append(_Mapped(ref, residual, slice_map, values if self.fusion else None))
        return mapped

    def _finish(
        self,
        entry: _Mapped,
        around: list[_Mapped | None],
        on_map: OnMap | None,
        kept: _SeriesMaps,
        on_flagged: OnMap | None = None,
        spacing: float | None = None,
        header: _SeriesHeader | None = None,
    ) -> InstanceResult:
        """The slice's raw score and (unfused models) candidate regions; verdicts are final only once the series is seen
        (`_relative_to_series`). `on_map` gets the provisional verdict at the lowest bar the series could set,
        so every slice that can end up suspicious is among those it sees as suspicious."""
        if entry.slice_map is None:
            return self._finish_lungless(entry, around, kept, spacing, header)
        amap = self.anomaly.finish(entry.slice_map, [n.slice_map if n else None for n in around])
        score = self.anomaly.slice_score(amap)
        lowest = self.anomaly.lowest_series_offset()
        threshold = self.slice_threshold
        verdict, reason = verdict_for(score - lowest, threshold)
        if reason == UNCALIBRATED_REASON:
            reason = self.uncalibrated_reason()
        # A fused model's regions are the deciding cue's peak, set once the series is seen (models/fused.py):
        # outlining the BTD map's candidates here would be thrown away (~9 % of a slice's work besides the model),
        # unless a per-slice model hands this verdict to `on_flagged` below as final.
        final_here = on_flagged is not None and not self.anomaly.series_relative and verdict == SUSPICIOUS
        regions = (
            find_regions(amap, self.anomaly.region_threshold + lowest, self.options.max_regions)
            if self.fusion is None or final_here
            else []
        )
        result = _instance_result(entry.ref, score, verdict, regions, reason)
        residual = entry.residual.mean(axis=0).astype(np.float32) if (on_map or on_flagged) else None
        kept.add(result, amap, entry.slice_map.in_lungs, residual)
        if self.fusion is not None and entry.values is not None:
            before, after = (n.values if n is not None else None for n in around)
            kept.cues[id(result)] = slice_cues(
                self.fusion, entry.values, entry.slice_map.search, entry.slice_map.in_lungs, amap, before, after,
                spacing, header.pixel_mm if header else 0.7,
            )
        if on_map is not None:
            on_map(result, residual)
        if final_here and on_flagged is not None:
            on_flagged(result, residual)  # a per-slice model's verdict is final here
        return result

    def _finish_lungless(
        self,
        entry: _Mapped,
        around: list[_Mapped | None],
        kept: _SeriesMaps,
        spacing: float | None,
        header: _SeriesHeader | None,
    ) -> InstanceResult:
        """A slice without lung that had no model pass (`_skips_lungless`): not assessed, as the fused step would
        mark it, with its other cues computed as before (their reasons can explain a series without lung)."""
        assert self.fusion is not None and entry.values is not None
        result = _not_assessed(entry.ref, LUNGLESS_SLICE)
        kept.add(result, None, False, None)
        before, after = (n.values if n is not None else None for n in around)
        kept.cues[id(result)] = slice_cues(
            self.fusion, entry.values, self.anomaly.search_mask(entry.values), False, None, before, after,
            spacing, header.pixel_mm if header else 0.7,
        )
        return result

    def _relative_to_series(self, instances: list[InstanceResult], kept: _SeriesMaps) -> None:
        """Scores, regions and verdicts relative to the series (a no-op unless the model is series-relative).

        Regions of the slices whose maps were kept are found again at the exact bar (threshold + offset), so
        their outlines hug what is above it; the others keep their candidates above it (found at the lowest
        possible bar, so their outlines can be wider)."""
        if not self.anomaly.series_relative:
            return
        lung_scores = [i.score for i in instances if i.score is not None and kept.in_lungs.get(id(i), False)]
        offset = self.anomaly.series_offset(lung_scores)
        bar = self.anomaly.region_threshold + offset
        for instance in instances:
            if instance.score is None:
                continue
            amap = kept.map_of(instance)
            regions = (
                find_regions(amap, bar, self.options.max_regions)
                if amap is not None
                else [r for r in instance.regions if r.score > bar]
            )
            instance.score -= offset
            instance.regions = [dataclasses.replace(r, score=r.score - offset) for r in regions]
            verdict, reason = verdict_for(instance.score, self.slice_threshold)
            if reason == UNCALIBRATED_REASON:
                reason = self.uncalibrated_reason()
            instance.verdict, instance.reason = verdict, reason

    def _fused_result(
        self,
        group: SeriesGroup,
        instances: list[InstanceResult],
        kept: _SeriesMaps,
        header: _SeriesHeader,
        reference: Reference | ReferenceSet | None,
        on_flagged: OnMap | None,
    ) -> SeriesResult:
        """The fused cues' verdict (models.fused): calibrated scores, regions by cue, reference, header cue."""
        assert self.fusion is not None
        cues: list[SliceCues | None] = [kept.cues.get(id(i)) for i in instances]
        by_uid = {ref.sop_instance_uid: k for k, ref in enumerate(group.slices)}
        signatures = [header.signatures.get(i.sop_instance_uid) if i.sop_instance_uid in by_uid else None
                      for i in instances]
        positions = [header.positions.get(i.sop_instance_uid) for i in instances]
        fused = fuse_series(
            self.fusion, instances, cues, header.key, group.series_instance_uid, self.references, reference,
            signatures, positions, slice_spacing(group),
        )
        if on_flagged is not None:
            for instance in instances:
                residual = kept.residual_of(instance)
                if instance.verdict == SUSPICIOUS and residual is not None:
                    on_flagged(instance, residual)
        result = self._series_result(group, instances)
        result.cues, result.reference, result.features = fused.cues, fused.reference, fused.features
        result.scanner_key = header.key.to_dict()
        if fused.not_assessed_reason and result.n_assessed == 0:
            result.verdict, result.score, result.reason = NOT_ASSESSED, None, fused.not_assessed_reason
        elif fused.header_flagged and result.verdict == NO_EVIDENCE:
            result.verdict = REVIEW
            n_flagged = len(fused.header_flagged)
            result.reason = f"{n_flagged} instance(s) re-written differently from their series (header cue)"
        return result

    def reference_features(self, result: SeriesResult) -> list[dict[str, Any]]:
        """Per-slice features of a scored series (JSON-able dicts) for fitting a site reference with
        models.reference.Reference.fit / refine. The caller decides what is genuine: only quiet series
        (verdict no_evidence, never a flagged study) should be accumulated. Empty for an unfused model."""
        return [dict(f) for f in result.features]

    def _series_result(self, group: SeriesGroup, instances: list[InstanceResult]) -> SeriesResult:
        scored = [i for i in instances if i.score is not None]
        score = max((i.score for i in scored), default=None)  # type: ignore[type-var]
        skipped = [i for i in instances if i.score is None]
        if not scored:
            reasons = sorted({i.reason or "not assessed" for i in instances})
            verdict, reason = NOT_ASSESSED, "no assessable images: " + "; ".join(reasons[:3])
        else:
            verdict, reason = verdict_for(score, self.series_threshold)
            if reason == UNCALIBRATED_REASON:
                reason = self.uncalibrated_reason()
            flagged = sum(1 for i in scored if i.verdict == SUSPICIOUS)
            if verdict == NO_EVIDENCE and flagged:
                verdict = REVIEW
                reason = f"{flagged} slice(s) over the slice threshold, series score under the series threshold"
            elif reason is None and skipped:
                reason = f"{len(skipped)} of {len(instances)} images not assessed ({skipped[0].reason})"
        return SeriesResult(
            study_instance_uid=group.study_instance_uid,
            series_instance_uid=group.series_instance_uid,
            modality=group.modality,
            verdict=verdict,
            score=score,
            reason=reason,
            instances=instances,
            n_assessed=len(scored),
            model=self.info.name,
        )


@dataclass
class _Mapped:
    """A slice run through the model (or, without lung, not: residual and map None), waiting for its successor
    before it can be finished."""

    ref: SliceRef
    residual: np.ndarray | None
    slice_map: SliceMap | None
    values: np.ndarray | None = None  # the slice in modality units, kept for the neighbours' continuity cue

    @property
    def shape(self) -> tuple[int, ...]:
        """The slice's (rows, columns): its map's, or its pixels' when it had no model pass."""
        if self.slice_map is not None:
            return tuple(self.slice_map.search.shape)
        assert self.values is not None
        return tuple(self.values.shape)


# (slice, its values in modality units, whether it needs a model pass) while a batch is gathered
_Pending = tuple[SliceRef, np.ndarray, bool]
# Slices without a pass gathered at most before a batch is sent on, however few of its slices need a pass: a
# series' run of slices without lung is finished a few at a time, never held whole (a batch: at most its
# `batch_size` passes and these).
_MOST_RIDING = 8


@dataclass
class _SeriesHeader:
    """What the fused cues need from the headers: the scanner key, pixel size, per-instance signatures and
    positions (read once per series, without pixels)."""

    key: ReferenceKey
    pixel_mm: float
    signatures: dict[str, dict[str, str]]
    positions: dict[str, float | None]

    @classmethod
    def read(cls, group: SeriesGroup) -> _SeriesHeader:
        key, pixel_mm = ReferenceKey("", "", "", "unknown"), 0.7
        signatures: dict[str, dict[str, str]] = {}
        positions: dict[str, float | None] = {}
        for ref in group.slices:
            positions[ref.sop_instance_uid] = ref.position
            try:
                ds = open_dataset(ref.source, header_only=True)
            except Exception:  # noqa: BLE001 - an unreadable file is reported by iter_slices
                continue
            signatures[ref.sop_instance_uid] = signature(ds)
            if not key.manufacturer and not key.kernel:
                key = reference_key(ds)
                spacing = ds.get("PixelSpacing")
                if spacing:
                    pixel_mm = float(spacing[0])
        return cls(key, pixel_mm, signatures, positions)


# Anomaly maps kept per series until its offset is known (float32, 1 MB each for a 512 x 512 slice).
TOP_MAPS_KEPT = 32


class _SeriesMaps:
    """What a series-relative verdict needs once the series is seen: which slices showed lung, and the
    anomaly maps (and, for `on_flagged`, residual maps) of the highest-scoring slices. Only those can end up
    suspicious first: the offset is common to the whole series, so ranking by raw score is the final ranking."""

    def __init__(self, keep: int, keep_residuals: bool = False) -> None:
        self.in_lungs: dict[int, bool] = {}  # id(result) -> its search region was the lungs
        self.cues: dict[int, SliceCues] = {}  # id(result) -> the fused cues' raw scores (fused models only)
        self._keep = keep
        self._keep_residuals = keep_residuals
        # (raw score, id(result), anomaly map, residual map or None): the lowest score first
        self._heap: list[tuple[float, int, np.ndarray, np.ndarray | None]] = []

    def add(
        self, result: InstanceResult, amap: np.ndarray | None, in_lungs: bool, residual: np.ndarray | None
    ) -> None:
        self.in_lungs[id(result)] = in_lungs
        if self._keep <= 0 or result.score is None or amap is None:
            return
        item = (float(result.score), id(result), amap, residual if self._keep_residuals else None)
        if len(self._heap) < self._keep:
            heapq.heappush(self._heap, item)
        elif item[0] > self._heap[0][0]:
            heapq.heapreplace(self._heap, item)

    def _entry(self, result: InstanceResult) -> tuple[float, int, np.ndarray, np.ndarray | None] | None:
        return next((item for item in self._heap if item[1] == id(result)), None)

    def map_of(self, result: InstanceResult) -> np.ndarray | None:
        entry = self._entry(result)
        return entry[2] if entry else None

    def residual_of(self, result: InstanceResult) -> np.ndarray | None:
        entry = self._entry(result)
        return entry[3] if entry else None


def slice_spacing(group: SeriesGroup) -> float | None:
    """The series' usual distance between slices, None without geometry."""
    return usual_spacing(ref.position for ref in group.slices if ref.position is not None)


class _NeighbourChain:
    """Finishes each slice once the next one is known, with the adjacent slices on either side.

    Adjacent: both slices have a position, the same size, and `models.series.adjacent` holds for them, so
    that a gap in the series (a missing slice, a second stack) never passes for a neighbour.
    """

    def __init__(self, finish: Callable[[_Mapped, list[_Mapped | None]], InstanceResult], spacing: float | None):
        self._finish = finish
        self._spacing = spacing
        self._previous: _Mapped | None = None
        self._current: _Mapped | None = None

    def adjacent(self, a: _Mapped, b: _Mapped) -> bool:
        return adjacent(a.ref.position, b.ref.position, self._spacing) and a.shape == b.shape

    def push(self, entry: _Mapped) -> list[InstanceResult]:
        finished = []
        if self._current is not None:
            following = entry if self.adjacent(self._current, entry) else None
            finished.append(self._finish(self._current, [self._previous, following]))
            self._previous = self._current if following is not None else None
        self._current = entry
        return finished

    def close(self) -> list[InstanceResult]:
        """Finish the last slice (no successor) and start a new chain."""
        finished = [self._finish(self._current, [self._previous, None])] if self._current is not None else []
        self._previous = self._current = None
        return finished


def _instance_result(
    ref: SliceRef, score: float | None, verdict: str, regions: list, reason: str | None
) -> InstanceResult:
    return InstanceResult(
        path=ref.path,
        sop_instance_uid=ref.sop_instance_uid,
        sop_class_uid=ref.sop_class_uid,
        frame=ref.frame,
        rows=ref.rows,
        columns=ref.columns,
        score=score,
        verdict=verdict,
        regions=regions,
        reason=reason,
    )


def _not_assessed(ref: SliceRef, reason: str) -> InstanceResult:
    return _instance_result(ref, None, NOT_ASSESSED, [], reason)


__all__ = ["DEFAULT_MODEL_PATH", "Detector", "DetectorError", "ScoringOptions", "UNCALIBRATED_REASON"]
