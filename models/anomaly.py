"""From a BTD residual map to a map of how unusual each pixel is, and a slice score.

Why not the raw residual (../shared/FINDINGS.md): at t = 0 the residual is dominated by anatomy (bone
edges, vessels), removals LOWER it, and its level differs by tissue. So the map here is:

1. local residual energy: log of the mean r^2 in a small window (``smoothing_px``);
2. normalised by what GENUINE scans show for the same kind of tissue: a reference table of the mean and
   standard deviation of that log-energy per (local HU bin x local structure bin), learned from genuine
   training slices (``fit_reference``) and stored in the model's metadata; z = (e - mean) / std;
3. two-sided: a region whose residual is far too LOW (in-painted, noise-free) is as suspicious as one
   far too high (pasted content): the map is |z| (``two_sided``), or z alone for the one-sided variant.
   Measured on the validation benchmark (training patients, 2026-11-30): the noise-matched removal
   (harmonic fill + the slice's own noise) RAISES z at its seam (mean z in its box above the genuine
   slice's in 14 of 18), while 67 of 114 genuine slices have their largest |z| on the LOW side (smooth soft
   tissue, clipped air), which is why the two-sided map loses; a separate low-side score with its own
   reference (smoothing 5-15 px) never put its maximum on a removal. One-sided as shipped;
4. searched only where the threat model tampers: the (dilated) lung mask (``lung_only``), falling back to
   the body when a slice has no lung;
5. judged against the slice itself (``per_slice``): z is re-centred and re-scaled by its median and MAD
   over the search region, because scanners and kernels differ in noise level (measured on the benchmark:
   this step lifted the high-pass baseline from 0.59 to 0.85 AUC on smooth injections);
6. compared with the neighbouring slices of the series (``neighbour_weight``): a real nodule, vessel or
   scanner artefact spans several slices, while a 2-D edit (a pasted nodule, an erased lesion) lives in
   one. The map of the slice minus ``neighbour_weight`` x the neighbours' maps, each widened by a maximum
   filter of ``neighbour_reach_px`` (so that a structure that moved a little between slices still cancels)
   and combined by ``neighbour_reduce``. A slice without adjacent neighbours keeps its own map. Measured on
   the forensic benchmark (docs/bench/forensics.md): a large gain on 2-D edits on its own, little on top of
   step 8, and a loss on 3-D-consistent edits, which it cannot see by construction; off in the shipped model;
7. aggregated over regions rather than one pixel: the map is averaged over ``region_px`` before the
   slice score takes its maximum;
8. judged against its own series (``series_relative``): a slice's score minus the median score of the
   series' lung slices (``series_offset``), because scanners, kernels and patients shift every slice of a
   series alike while an edit touches a few. A series with fewer than ``series_min_slices`` lung slices
   uses the genuine reference median instead, and a quiet series never lowers the bar by more than
   ``series_max_lowering``. Measured on the forensic benchmark: the largest gain of all
   (docs/bench/forensics.md).

Without a reference table (an old metadata file) step 2 uses one global mean/std (``energy_mean``,
``energy_std``), which is the first version's behaviour.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from models.lungmask import body_mask as _body_mask
from models.lungmask import lung_mask, share
from models.window import Window, gaussian_reach, uniform_reach

BODY_HU_THRESHOLD = -500.0
# Local-HU bin edges: lung parenchyma is finely binned (that is where tampering happens), denser tissue coarsely.
DEFAULT_HU_EDGES = [-950.0, -900.0, -850.0, -800.0, -700.0, -550.0, -350.0, -150.0, 0.0, 100.0, 250.0]
# Structure bins: gradient magnitude (HU per pixel) of the image smoothed beyond the noise scale, so that
# anatomy edges are "explained" while the noise level (what in-painting changes) is not conditioned on.
DEFAULT_STRUCTURE_EDGES = [5.0, 15.0, 40.0, 100.0]
STRUCTURE_SIGMA_PX = 3.0
MIN_BIN_COUNT = 200
NEIGHBOUR_REDUCTIONS = ("max", "mean")


_COUNTED_EDGES = 32  # up to this many edges a pixel's bin is counted by comparisons (below 256: one byte)


def bin_index(values: np.ndarray, edges: Sequence[float]) -> np.ndarray:
    """`np.digitize(values, edges)` for float32 values, compared in float32 where every edge is a float32 value.

    Why: digitize compares in float64, converting the slice first (5.8 ms for 512 x 512, against 3.7 in
    float32). Comparing in float32 gives the same answer only when each edge converts exactly (all the shipped
    edges do: -950 ... 250 HU, 5 ... 100 HU per pixel); otherwise, and for edges not in increasing order, this is
    digitize itself."""
    bounds = np.asarray(edges, dtype=np.float64)
    narrow = bounds.astype(np.float32)
    exact = values.dtype == np.float32 and np.array_equal(narrow, bounds) and bool(np.all(np.diff(bounds) > 0))
    if not exact:
        return np.digitize(values, edges)
    if len(narrow) <= _COUNTED_EDGES and not np.isnan(values).any():
        # The bin is the number of edges at or below the value (searchsorted's "right"): counted in one byte
        # per pixel, one comparison per edge, 0.5 ms for both of a 512 x 512 slice's bins against 6.7 for
        # searchsorted's binary search per pixel (Intel Xeon VM, 2026-12-05). NaN sorts after every edge in
        # searchsorted but compares False: such an image takes searchsorted.
        counts = np.zeros(values.shape, dtype=np.uint8)
        for edge in narrow:
            np.add(counts, values >= edge, out=counts)
        return counts.astype(np.intp)
    return np.searchsorted(narrow, values, side="right")


def _window_of(features: dict[str, np.ndarray], shape: tuple[int, ...]) -> Window:
    """The window a features dict's tissue bins cover (features made before windows: the whole slice)."""
    if "window" not in features:
        return Window.whole(shape)
    top, bottom, left, right = (int(v) for v in features["window"])
    return Window(top, bottom, left, right, (int(shape[0]), int(shape[1])))


def _squared(residual: np.ndarray) -> np.ndarray:
    """`residual.astype(np.float32) ** 2` of a (H, W) map, or of the channels' mean of a (C, H, W) one.

    One channel (the shipped model) is squared as it is: its mean over one channel is the same values (a sum
    of one item, divided by one) but for the sign of a zero (the sum starts from +0.0), which the square
    removes; that saves the reduction's pass and copy (~0.5 ms of a 512 x 512 slice, 2026-12-05). A float32
    map is squared without a copy first (`x ** 2` is `np.square`)."""
    if residual.ndim == 3:
        residual = residual[0] if residual.shape[0] == 1 else residual.mean(axis=0)
    return np.square(residual.astype(np.float32, copy=False))


def sobel_magnitude(image: np.ndarray) -> np.ndarray:
    """`np.hypot(ndimage.sobel(image, 0), ndimage.sobel(image, 1)) / 8`, value for value, in 55 % of its time.

    Why: the structure bins of every slice need it, and scipy runs each 1-D pass through a line buffer (5 ms
    a 512 x 512 Sobel). scipy's Sobel along an axis is the difference of the pixels either side along it,
    computed in float64 and stored as float32, then [1, 2, 1] across, in float64 as ``x * 2 + (left +
    right)``, stored as float32; borders mirrored ("reflect", numpy's "symmetric"). The difference is taken
    in float32 here: one operation rounded to float64 then float32 equals it rounded to float32 once (53 >=
    2 x 24 + 2 bits: double rounding is innocuous); the [1, 2, 1] pass, three operations, runs in float64 in
    scipy's order. tests/test_exact_shortcuts.py compares both on real slices and on 16 decades of range.
    """
    if image.dtype != np.float32 or image.ndim != 2:
        return np.hypot(ndimage.sobel(image, 0), ndimage.sobel(image, 1)) / 8.0
    padded = np.pad(image, 1, mode="symmetric")
    along_rows = padded[2:, 1:-1] - padded[:-2, 1:-1]  # axis 0
    along_columns = padded[1:-1, 2:] - padded[1:-1, :-2]  # axis 1
    across = np.pad(along_rows, ((0, 0), (1, 1)), mode="symmetric").astype(np.float64)
    sobel_0 = (across[:, 1:-1] * 2.0 + (across[:, :-2] + across[:, 2:])).astype(np.float32)
    across = np.pad(along_columns, ((1, 1), (0, 0)), mode="symmetric").astype(np.float64)
    sobel_1 = (across[1:-1] * 2.0 + (across[:-2] + across[2:])).astype(np.float32)
    return np.hypot(sobel_0, sobel_1) / 8.0


@dataclass
class SliceMap:
    """One slice's map before it meets its neighbours: z (signed or |z|, per the model) and where to search.

    Why a stage of its own: the neighbouring-slice comparison needs the maps of slices k-1 and k+1, so a
    series is mapped slice by slice, and each slice finished once its successor is known.
    """

    z: np.ndarray  # over `window` only
    search: np.ndarray  # the whole slice
    in_lungs: bool = False  # the search region is the lungs (not the body fallback of a lungless slice)
    window: Window | None = None  # where z was computed (None: the whole slice)
    _widened: dict[int, np.ndarray] = field(default_factory=dict, repr=False)

    def widened(self, reach_px: int) -> np.ndarray:
        """The map under a maximum filter of `reach_px` (cached: each slice is the neighbour of two)."""
        if reach_px not in self._widened:
            self._widened[reach_px] = (
                ndimage.maximum_filter(self.z, size=reach_px) if reach_px > 1 else self.z
            ).astype(np.float32)
        return self._widened[reach_px]


@dataclass
class AnomalyModel:
    """Reference statistics of genuine residual energy, and how to turn deviations into scores."""

    energy_mean: float = 0.0
    energy_std: float = 1.0
    smoothing_px: int = 5
    region_threshold: float = 4.0
    region_px: int = 5
    two_sided: bool = True
    lung_only: bool = True
    lung_dilate_px: int = 10
    hu_edges: list[float] = field(default_factory=lambda: list(DEFAULT_HU_EDGES))
    structure_edges: list[float] = field(default_factory=lambda: list(DEFAULT_STRUCTURE_EDGES))
    # (len(hu_edges)+1) x (len(structure_edges)+1) tables; empty = not fitted (global statistics only)
    ref_mean: list[list[float]] = field(default_factory=list)
    ref_std: list[list[float]] = field(default_factory=list)
    normalise: bool = True
    # Re-centre and re-scale z by its own median / MAD over the slice's search region: scanners and
    # reconstruction kernels differ in noise level, so "unusual" is judged against this slice's own tissue.
    per_slice: bool = True
    # Neighbouring-slice consistency (step 6 above); 0 = off, the behaviour of models shipped before it.
    neighbour_weight: float = 0.0
    neighbour_reduce: str = "max"
    neighbour_reach_px: int = 15
    # Series-relative scores (step 8 above); off = the behaviour of models shipped before it.
    series_relative: bool = False
    series_min_slices: int = 8
    reference_median: float = 0.0  # median raw slice score of genuine calibration slices
    series_max_lowering: float = 1.0

    FIELDS = (
        "energy_mean",
        "energy_std",
        "smoothing_px",
        "region_threshold",
        "region_px",
        "two_sided",
        "lung_only",
        "lung_dilate_px",
        "hu_edges",
        "structure_edges",
        "ref_mean",
        "ref_std",
        "normalise",
        "per_slice",
        "neighbour_weight",
        "neighbour_reduce",
        "neighbour_reach_px",
        "series_relative",
        "series_min_slices",
        "reference_median",
        "series_max_lowering",
    )

    @classmethod
    def from_metadata(cls, config: dict[str, Any] | None) -> AnomalyModel:
        if not config:
            return cls()
        known = {k: config[k] for k in cls.FIELDS if k in config}
        if config.get("kind") == "log-energy-z" and "two_sided" not in config:
            # The first version's metadata: one-sided, whole body, no tissue table.
            known.update(
                two_sided=False,
                lung_only=False,
                per_slice=False,
                region_px=1,
                smoothing_px=int(config.get("smoothing_px", 9)),
            )
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "tissue-normalised-energy", **{k: getattr(self, k) for k in self.FIELDS}}

    def variant(self, **changes: Any) -> AnomalyModel:
        """A copy with some settings changed (the benchmark's ablations)."""
        return AnomalyModel.from_metadata({**self.to_dict(), **changes})

    # --- masks and features ------------------------------------------------------------------------
    def body_mask(self, hu: np.ndarray) -> np.ndarray:
        """Pixels inside the patient: air outside the body can hold no tampering worth flagging."""
        return _body_mask(hu)

    def search_mask(self, hu: np.ndarray) -> np.ndarray:
        """Where tampering is looked for: the dilated lungs, or the body when the slice has no lung."""
        body = self.body_mask(hu)
        return self._lungs_or_body(hu, body)[0] if self.lung_only else body

    def has_lungs(self, hu: np.ndarray) -> bool:
        """Whether lung covers at least 1 % of the slice (else the search region falls back to the body)."""
        return self._lungs_or_body(hu, self.body_mask(hu))[1]

    def _lungs_or_body(self, hu: np.ndarray, body: np.ndarray) -> tuple[np.ndarray, bool]:
        """The dilated lungs and True, or `body` and False when lung is under 1 % of the slice."""
        lungs = lung_mask(hu, dilate_px=self.lung_dilate_px)
        has_lungs = share(lungs) > 0.01
        return (lungs if has_lungs else body), has_lungs

    def log_energy(self, residual: np.ndarray, window: Window | None = None) -> np.ndarray:
        """The log of the residual's local mean square, per pixel of `window` (default: the whole slice)."""
        window = window or Window.whole(residual.shape[-2:])
        energy = window.filtered(
            residual, uniform_reach(self.smoothing_px),
            lambda part: ndimage.uniform_filter(_squared(part), size=self.smoothing_px),
        )
        return np.log(energy + 1e-10).astype(np.float32)

    def tissue_bins(self, hu: np.ndarray, window: Window | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(HU bin, structure bin) per pixel of `window` (default: the whole slice), from the local mean HU
        and the smoothed image's gradient."""
        window = window or Window.whole(hu.shape)
        local_hu = window.filtered(
            hu, uniform_reach(self.smoothing_px),
            lambda part: ndimage.uniform_filter(part.astype(np.float32), size=self.smoothing_px),
        )
        # The Sobel reads one pixel around each, so the smoothed image is made one pixel wider than the window.
        around = window.grown(1)
        smooth = around.filtered(
            hu, gaussian_reach(STRUCTURE_SIGMA_PX),
            lambda part: ndimage.gaussian_filter(part.astype(np.float32), STRUCTURE_SIGMA_PX),
        )
        gradient = sobel_magnitude(smooth)[window.within(around)]
        return bin_index(local_hu, self.hu_edges), bin_index(gradient, self.structure_edges)

    def map_window(self, search: np.ndarray) -> Window:
        """Where a slice's z is needed: its search region's bounding box widened by the region mean's reach
        (`finish` sets every value outside the search region to one floor). The whole slice when neighbours
        are compared: their maps are read around the slice's own search region."""
        if self.neighbour_weight > 0:
            return Window.whole(search.shape)
        return Window.around(search, uniform_reach(self.region_px) if self.region_px > 1 else 0)

    # --- the map -----------------------------------------------------------------------------------
    def features(self, hu: np.ndarray, *, windowed: bool = False) -> dict[str, np.ndarray]:
        """What the map needs from the HU image alone; compute once and pass to several maps of one slice.

        windowed: the tissue bins only inside `map_window` of the search region (entry "window": top,
        bottom, left, right), which is all a map reads; default the whole slice (fitting a reference, the
        benchmarks' ablations)."""
        body = self.body_mask(hu)
        lungs, has_lungs = self._lungs_or_body(hu, body)
        window = self.map_window(lungs if self.lung_only else body) if windowed else Window.whole(hu.shape)
        hu_bin, structure_bin = self.tissue_bins(hu, window)
        return {
            "hu_bin": hu_bin,
            "structure_bin": structure_bin,
            "body": body,
            "lungs": lungs,
            "has_lungs": np.array(has_lungs),
            "window": np.array([window.top, window.bottom, window.left, window.right]),
            "key": np.array([self.smoothing_px, self.lung_dilate_px, *self.hu_edges, *self.structure_edges]),
        }

    def _features(
        self,
        hu: np.ndarray,
        features: dict[str, np.ndarray] | None,
        needs_bins: bool | None = None,
        windowed: bool = False,
    ) -> dict[str, np.ndarray]:
        """Reuse the caller's features when they were computed with settings that give the same values.

        needs_bins: whether the tissue bins will be read (default: when a fitted table will be applied;
        fitting one passes True, so that a table is never fitted on bins of other edges).
        """
        if features is not None:
            same_masks = int(features["key"][1]) == self.lung_dilate_px
            if needs_bins is None:
                needs_bins = self.normalise and bool(self.ref_mean)
            key = np.array([self.smoothing_px, self.lung_dilate_px, *self.hu_edges, *self.structure_edges])
            if same_masks and self._bins_cover(features, hu.shape, windowed) and (
                not needs_bins or np.array_equal(features["key"], key)
            ):
                return features
        return self.features(hu, windowed=windowed)

    def _bins_cover(self, features: dict[str, np.ndarray], shape: tuple[int, ...], windowed: bool) -> bool:
        """Whether the tissue bins of `features` cover what is asked: the whole slice, or (windowed) this
        model's `map_window` of the features' search region (another model's window may be narrower)."""
        window = _window_of(features, shape)
        if window.is_whole:
            return True
        return windowed and window.holds(self.map_window(features["lungs"] if self.lung_only else features["body"]))

    def z_map(self, residual: np.ndarray, hu: np.ndarray, features: dict[str, np.ndarray] | None = None) -> np.ndarray:
        """Signed deviation of the local log-energy from genuine tissue of the same kind (not masked), over
        the window of `features` (the whole slice without them)."""
        windowed = features is not None and not _window_of(features, hu.shape).is_whole
        if self.normalise and self.ref_mean:
            features = self._features(hu, features, windowed=windowed)
        energy = self.log_energy(residual, _window_of(features, hu.shape) if features is not None else None)
        if not self.normalise:
            return energy
        if self.ref_mean:
            assert features is not None
            hu_bin, structure_bin = features["hu_bin"], features["structure_bin"]
            mean_table = np.asarray(self.ref_mean, dtype=np.float32)
            std_table = np.maximum(np.asarray(self.ref_std, dtype=np.float32), 1e-3)
            n_structure = len(self.structure_edges) + 1
            if mean_table.shape != std_table.shape or mean_table.shape != (len(self.hu_edges) + 1, n_structure):
                return (energy - mean_table[hu_bin, structure_bin]) / std_table[hu_bin, structure_bin]
            # One flat index and `take`: the same values as indexing the tables by (row, column), in a third of
            # the time (the floor of 1e-3 taken on the table first: a maximum commutes with picking entries).
            where = hu_bin * n_structure + structure_bin
            return (energy - mean_table.ravel().take(where)) / std_table.ravel().take(where)
        return (energy - self.energy_mean) / max(self.energy_std, 1e-6)

    def slice_map(
        self, residual: np.ndarray, hu: np.ndarray, features: dict[str, np.ndarray] | None = None
    ) -> SliceMap:
        """The slice's own map (z, signed or |z|) and its search region, before neighbours and regions."""
        needs_features = (self.normalise and self.ref_mean) or self.lung_only or self.per_slice
        feats = self._features(hu, features, windowed=True) if needs_features else None
        z = self.z_map(residual, hu, feats)
        search = (feats["lungs"] if self.lung_only else feats["body"]) if feats is not None else self.body_mask(hu)
        window = _window_of(feats, hu.shape) if feats is not None else Window.whole(hu.shape)
        if self.per_slice and search.any():
            inside = search[window.index]
            centre = float(np.median(z[inside]))
            spread = float(np.median(np.abs(z[inside] - centre))) * 1.4826 + 1e-3
            z = (z - centre) / spread
        in_lungs = bool(self.lung_only and feats is not None and feats.get("has_lungs", False))
        return SliceMap((np.abs(z) if self.two_sided else z).astype(np.float32), search, in_lungs, window)

    def finish(self, own: SliceMap, neighbours: Sequence[SliceMap | None] = ()) -> np.ndarray:
        """The anomaly map of `own` given its adjacent slices (None where a neighbour is missing)."""
        amap = own.z
        window = own.window or Window.whole(own.search.shape)
        present = [n for n in neighbours if n is not None and n.z.shape == own.z.shape]
        if self.neighbour_weight > 0 and present:
            if not window.is_whole:
                raise ValueError("a map compared with its neighbours must cover the whole slice (map_window)")
            if self.neighbour_reduce not in NEIGHBOUR_REDUCTIONS:
                raise ValueError(f"neighbour_reduce {self.neighbour_reduce!r}: use one of {NEIGHBOUR_REDUCTIONS}")
            widened = [n.widened(self.neighbour_reach_px) for n in present]
            context = np.maximum.reduce(widened) if self.neighbour_reduce == "max" else np.mean(widened, axis=0)
            amap = amap - self.neighbour_weight * context
        if self.region_px > 1:
            amap = ndimage.uniform_filter(amap, size=self.region_px)
        search = own.search
        # Outside the search region: never above anything inside it (a one-sided map can be negative). The
        # window holds the whole search region, so the floor is the same whichever part of the map was made.
        floor = min(0.0, float(amap[search[window.index]].min())) if search.any() else 0.0
        amap = window.pasted(amap, floor)  # a new array: own.z stays intact for its neighbours
        amap[~search] = floor
        return amap

    def anomaly_map(
        self,
        residual: np.ndarray,
        hu: np.ndarray,
        features: dict[str, np.ndarray] | None = None,
        neighbours: Sequence[SliceMap | None] = (),
    ) -> np.ndarray:
        """residual: (C, H, W) or (H, W) float32; hu: (H, W). Returns (H, W) float32, higher = more unusual.

        features: ``self.features(hu)`` when the caller maps one slice several times (benchmark ablations);
        neighbours: the `slice_map` of the adjacent slices of the series, when there are any.
        """
        return self.finish(self.slice_map(residual, hu, features), neighbours)

    def slice_score(self, amap: np.ndarray) -> float:
        return float(amap.max()) if amap.size else 0.0

    def lowest_series_offset(self) -> float:
        """The least a series can subtract from its slices' scores (so candidates can be kept while streaming)."""
        return self.reference_median - self.series_max_lowering if self.series_relative else 0.0

    def series_offset(self, lung_slice_scores: Sequence[float]) -> float:
        """What to subtract from every slice score of a series: the median of its lung slices' raw scores,
        or the genuine reference median for a short series; never below `lowest_series_offset`."""
        if not self.series_relative:
            return 0.0
        if len(lung_slice_scores) < self.series_min_slices:
            return self.reference_median
        return max(float(np.median(lung_slice_scores)), self.lowest_series_offset())

    # --- learning the reference from genuine slices ------------------------------------------------
    def fit_reference(self, pairs: Iterable[tuple[np.ndarray, ...]]) -> AnomalyModel:
        """Learn per-tissue mean/std of the log-energy from genuine (residual, hu[, features]), in the search mask.

        Bins with too few genuine pixels borrow the statistics of the nearest populated HU bin of the same
        structure class (then the global ones), so that no tissue is left without a reference.
        """
        n_hu, n_structure = len(self.hu_edges) + 1, len(self.structure_edges) + 1
        total = np.zeros((n_hu, n_structure))
        total_sq = np.zeros((n_hu, n_structure))
        count = np.zeros((n_hu, n_structure))
        all_values: list[np.ndarray] = []
        for residual, hu, *maybe_features in pairs:
            energy = self.log_energy(residual)
            feats = self._features(hu, maybe_features[0] if maybe_features else None, needs_bins=True)
            hu_bin, structure_bin = feats["hu_bin"], feats["structure_bin"]
            mask = feats["lungs"] if self.lung_only else feats["body"]
            flat = hu_bin[mask] * n_structure + structure_bin[mask]
            values = energy[mask].astype(np.float64)
            count += np.bincount(flat, minlength=n_hu * n_structure).reshape(n_hu, n_structure)
            total += np.bincount(flat, values, minlength=n_hu * n_structure).reshape(n_hu, n_structure)
            total_sq += np.bincount(flat, values**2, minlength=n_hu * n_structure).reshape(n_hu, n_structure)
            all_values.append(values[:: max(1, values.size // 20000)])
        pooled = np.concatenate(all_values) if all_values else np.zeros(1)
        global_mean, global_std = float(pooled.mean()), float(pooled.std() + 1e-6)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = total / count
            std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
        populated = count >= MIN_BIN_COUNT
        for j in range(n_structure):
            good = np.nonzero(populated[:, j])[0]
            for i in range(n_hu):
                if populated[i, j]:
                    continue
                if len(good):
                    nearest = good[np.argmin(np.abs(good - i))]
                    mean[i, j], std[i, j] = mean[nearest, j], std[nearest, j]
                else:
                    mean[i, j], std[i, j] = global_mean, global_std
        return self.variant(
            energy_mean=global_mean,
            energy_std=global_std,
            ref_mean=np.round(mean, 5).tolist(),
            ref_std=np.round(np.maximum(std, 0.05), 5).tolist(),
        )
