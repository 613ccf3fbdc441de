"""Typed, immutable configuration: one frozen dataclass per pipeline stage.

A YAML file holds one mapping per section (``selection``, ``registration``,
``propagation``, ``fusion``, ``evaluation``, ``parallel``, ``output``). Keys left
out take the defaults below, which equal ``configs/default.yaml``. Unknown keys,
wrong types and out-of-range values are rejected before any work starts, naming
the key path and the file.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError

AFFINE_STAGES = ("translation", "rigid", "similarity", "affine")


class _FieldError(ConfigError):
    """An invalid value of one field; the loader prefixes the key path and file."""

    def __init__(self, name: str, message: str):
        super().__init__(f"{name}: {message}")
        self.name = name
        self.message = message


def _require(condition: bool, name: str, message: str) -> None:
    if not condition:
        raise _FieldError(name, message)


def _check_per_level(stage, name: str, what: str) -> None:
    """A per-level setting of ``stage`` (one value, or a tuple coarse to fine): a tuple has an entry per level of
    explicit ``shrink_factors`` (any length with ``auto``: see ``registration.pyramid.per_level``), and one at least."""
    values = getattr(stage, name)
    if not isinstance(values, tuple):
        return
    _require(
        stage.shrink_factors == "auto" or len(values) == len(stage.shrink_factors),
        name,
        f"one {what} for every level, or a list with one entry per level",
    )
    _require(len(values) >= 1, name, "at least one level is needed")


def _check_pyramid(stage) -> None:
    """Checks shared by the registration stages: levels, iterations, metric sampling.

    With ``shrink_factors: auto`` the number of levels comes from the image, so the per-level lists may
    have any length (see ``registration.pyramid.per_level``); with explicit factors, one entry per level.
    """
    explicit = stage.shrink_factors != "auto"
    _require(len(stage.smoothing_sigmas) >= 1, "smoothing_sigmas", "at least one level is needed")
    _require(
        not explicit or len(stage.shrink_factors) == len(stage.smoothing_sigmas),
        "smoothing_sigmas",
        "shrink_factors, smoothing_sigmas must have one entry per level",
    )
    _require(not explicit or len(stage.shrink_factors) >= 1, "shrink_factors", "at least one level is needed")
    _require(not explicit or all(s >= 1 for s in stage.shrink_factors), "shrink_factors", "must be >= 1")
    _require(all(s >= 0 for s in stage.smoothing_sigmas), "smoothing_sigmas", "must be >= 0 (mm)")
    _check_per_level(stage, "iterations", "number")
    counts = stage.iterations if isinstance(stage.iterations, tuple) else (stage.iterations,)
    _require(all(i >= 1 for i in counts), "iterations", "must be >= 1")
    _require(0 < stage.sampling_percentage <= 1, "sampling_percentage", "must be in (0, 1]")


@dataclass(frozen=True)
class SelectionConfig:
    """Atlas ranking against the target.

    Every atlas is scored after the affine stage, in target space, on an isotropic grid;
    a higher score is better for every metric.

    Parameters
    ----------
    k : int or "all"
        Most best-ranked atlases kept for non-rigid registration. The default, 10, is
        about as accurate as all of them with joint label fusion on real data
        (``benchmarks/fusion.py`` measures it), and keeps the non-rigid and fusion time
        per target bounded however many atlases there are (the affine stage, or the
        prescreening of a large library, ranks the rest).
    threshold : float or None
        When set, only atlases scoring at least this are kept (of the best ``k``).
    min_atlases : int or "auto"
        Fewest atlases a target is segmented with. Selection keeps the best
        ``min_atlases`` even when fewer reach ``threshold``; when non-rigid registrations
        fail, the next-ranked atlases are registered in their place; when still fewer
        remain, the target fails with an error. ``auto``: half of the ``k`` selected (rounded
        up) and never fewer than 3, or all of them where fewer are selected.
    max_dropped_share : float
        A target that loses more than this share of its atlases (failed registrations, over the
        atlases it was given) is segmented but marked ``status: degraded`` in run.json, and
        ``atlasseg run`` exits with code 3 unless ``--allow-degraded``; ``crossval`` marks such
        left-out atlases in crossval.json (``degraded_targets``) and exits 3 likewise.
    metric : str
        Score: ``ncc`` (normalised cross-correlation), ``mi`` (mutual information of a
        32-bin joint histogram, nats), ``mse`` (mean squared intensity difference,
        negated so that higher is better) or ``nmse`` (the same after each image's scored
        voxels are standardised to zero mean and unit variance: ``2 ncc - 2``, so it ranks as ``ncc``).
    roi : str
        Where the score is computed: ``none`` (the target's whole field of view),
        ``near_labels`` (the voxels within ``roi_margin`` of the atlas's labels mapped
        through its affine transform) or ``labels`` (the bounding box, along the target's
        axes, of those mapped labels, grown by ``roi_margin``). A target with a ``mask``
        in the manifest is scored only inside its mask as well.
    roi_margin : float, mm
        Margin around the mapped labels (``near_labels``), or added on every side of
        their bounding box (``labels``).
    grid_spacing : float, mm
        Spacing of the isotropic grid, in target space, on which atlases are compared
        after the affine stage (never finer than the target's own voxels).
    prescreen : int or "all"
        In a library of more atlases than this (and with ``k`` a number), only this many (never
        fewer than ``k``) go on to
        the affine stage and the ranking above: those that score best (``metric`` over their
        ``roi``) in a common reference space, the first atlas listed, onto which every atlas is
        registered once (cached, reused by every later target and run) and each target once
        (see ``atlasseg/library.py``). A target's cost then no longer grows with the library.
        ``all``: every atlas is registered onto every target and ranked there.
    """

    k: Union[int, Literal["all"]] = 10
    threshold: Optional[float] = None
    min_atlases: Union[int, Literal["auto"]] = "auto"
    max_dropped_share: float = 0.25
    metric: Literal["ncc", "mi", "mse", "nmse"] = "ncc"
    roi: Literal["none", "near_labels", "labels"] = "near_labels"
    roi_margin: float = 2.0
    grid_spacing: float = 1.0
    prescreen: Union[int, Literal["all"]] = 30

    def __post_init__(self):
        _require(self.k == "all" or self.k >= 1, "k", f"must be >= 1 or 'all', got {self.k}")
        if self.min_atlases != "auto":
            _require(self.min_atlases >= 1, "min_atlases", f"must be >= 1 or 'auto', got {self.min_atlases}")
            _require(self.k == "all" or self.min_atlases <= self.k, "min_atlases", f"must be <= k ({self.k})")
        _require(
            0 <= self.max_dropped_share < 1, "max_dropped_share", f"must be in [0, 1), got {self.max_dropped_share}"
        )
        _require(self.roi_margin >= 0, "roi_margin", "must be >= 0 (mm)")
        _require(self.grid_spacing > 0, "grid_spacing", "must be > 0 (mm)")
        _require(
            self.prescreen == "all" or self.prescreen >= 1, "prescreen", f"must be >= 1 or 'all', got {self.prescreen}"
        )


@dataclass(frozen=True)
class AffineConfig:
    """Linear stage: initialisation then a chain of increasingly general transforms.

    Parameters
    ----------
    initialization : str
        ``geometry`` (image centres), ``moments`` (centres of mass and principal
        axes), ``landmarks`` (a rigid fit of corresponding points given with the
        images; see ``registration.landmarks``) or ``none`` (identity).
    stages : list of str
        Chain run in order, from ``translation``, ``rigid``, ``similarity``, ``affine``; each
        stage starts from the previous one. Empty: the initialisation only.
    metric : str
        ``mattes`` (Mattes mutual information: for different contrasts), ``ncc``
        (normalised correlation), ``mse`` (mean squares), ``nmse`` (mean squares of the
        images standardised first, each to zero mean and unit variance over its whole
        domain: unchanged by a linear change of either's intensities) or ``ants_ncc`` (ANTs
        neighbourhood correlation). ITK's joint-histogram MI is not offered: its
        gradient is wrong in the SimpleITK releases available (ITK issue 6570).
    optimizer : str
        ``regular_step`` (regular-step gradient descent), ``gradient_descent``
        (gradient descent with a golden-section line search) or ``lbfgsb``.
    shrink_factors : list of int or auto
        Pyramid, coarse to fine: voxels binned per level along every axis, or ``auto`` (the default): the
        non-rigid stage's derived levels (each axis binned towards 2, 4, 8 ... × the finest voxel, thick
        slices kept) from its coarsest down to the coarsest level with 64 voxels across the longest extent,
        never full resolution, at least two (``registration.pyramid.derive_affine_shrink_factors``). On
        35×50×35 mm crops that is the ``[4, 2]`` it replaced; on 8 mm cardiac slices ``[4, 2]`` had left 3 of
        13 slices at the coarse level; on 1.25 mm abdominal scans it stops at 5 mm in-plane.
    smoothing_sigmas : list of float, mm
        Gaussian smoothing per level, coarse to fine; with ``auto`` factors a list of another length than
        the levels derived is fitted to them as the non-rigid stage's is.
    iterations : int
        Maximum optimiser iterations at every level.
    learning_rate : float
        ``regular_step``: the first step, in mm of the largest voxel shift (parameter
        scales come from physical shift); ``gradient_descent``: the step the line search
        explores up to 5 times. Never estimated behind the user's back. Unused by ``lbfgsb``.
    sampling_strategy : str
        Metric samples: ``random``, ``regular`` (a regular grid, randomly offset) or ``none`` (every voxel).
    sampling_percentage : float
        Fraction of voxels sampled by ``random``/``regular``.
    max_samples : int
        At most this many samples per pyramid level (the share is lowered on large images): a linear
        transform's few parameters need a number of samples, not a share of the image. 0 = no limit
        (the default: 20000 halved the affine's time on 256×256×40 abdominal scans, and cost CHAOS
        leave-one-out 0.003 Dice, which is not yet shown to be sampling noise).
    translation_search : float
        Before the chain, a search for the start: every translation of the initialisation up to ± this
        share of the two images' common extent along each axis, on a grid of about 8 mm (the thick axis
        of an anisotropic scan at its own spacing), is scored at once by FFT (normalised correlation over
        the images' overlap, shifts overlapping less than half the smaller image left out), and the best
        seeds the chain. Fields of view that cover different stretches of the body (an abdominal scan
        reaching the pelvis or not) put the image centres centimetres apart on the anatomy, beyond what
        the chain recovers from, and a few optimised starts each stop in their own local optimum. Applied
        to scans of a body region only (the target's longest extent 160 mm or more; not to crops round
        the anatomy), and a found start is kept only if it beats the initialisation at full resolution;
        the record's ``translation_search`` says what it found. 0 = no search.
    local_normalization : float, mm
        The metric compares the images each with its local mean (a Gaussian window of this sigma)
        subtracted and divided by its local standard deviation: slow intensity changes across the
        field of view (MRI coil shading and bias fields, which vary over decimetres) no longer pull
        the alignment. Applied to scans of a body region only (as ``translation_search``): a crop a few
        centimetres wide has no shading to remove; the record says which (``local_normalization``, 0 = off)
        and its ``metric_before``/``metric_after`` are on the images compared. 0 = never.
    """

    initialization: Literal["geometry", "moments", "landmarks", "none"] = "geometry"
    stages: tuple[str, ...] = ("affine",)
    metric: Literal["mattes", "ncc", "mse", "nmse", "ants_ncc"] = "ncc"
    optimizer: Literal["regular_step", "gradient_descent", "lbfgsb"] = "regular_step"
    shrink_factors: tuple[int, ...] | Literal["auto"] = "auto"
    smoothing_sigmas: tuple[float, ...] = (1.0, 0.0)
    iterations: int = 50
    learning_rate: float = 1.0
    sampling_strategy: Literal["random", "regular", "none"] = "random"
    sampling_percentage: float = 0.25
    max_samples: int = 0
    translation_search: float = 0.2
    local_normalization: float = 20.0

    def __post_init__(self):
        _require(0 <= self.translation_search < 0.5, "translation_search", "must be in [0, 0.5)")
        _require(self.local_normalization >= 0, "local_normalization", "must be >= 0 (mm)")
        _require(self.max_samples >= 0, "max_samples", "must be >= 0 (0 = no limit)")
        for stage in self.stages:
            _require(stage in AFFINE_STAGES, "stages", f"unknown stage {stage!r} (known: {', '.join(AFFINE_STAGES)})")
        order = [AFFINE_STAGES.index(s) for s in self.stages]
        _require(order == sorted(set(order)), "stages", "stages must go from less to more general, each once")
        _check_pyramid(self)
        _require(self.learning_rate > 0, "learning_rate", "must be > 0")


@dataclass(frozen=True)
class NonrigidConfig:
    """Non-rigid stage on a coarse-to-fine pyramid, starting from the affine result.

    Parameters
    ----------
    enabled : bool
        Run the non-rigid stage after the affine one.
    method : str
        ``bspline`` (free-form deformation; any metric) or ``demons`` (a dense
        displacement field; same-contrast images only, often faster).
    shrink_factors : list of int or auto
        Pyramid, coarse to fine: voxels binned per level along every axis, or ``auto``: derived from the
        target's size and spacing (level ``l`` bins each axis towards ``2**l`` times the finest voxel size,
        a thick-slice axis only once its voxels are that coarse and never below 8 voxels; levels until the
        coarsest voxels reach 1/32 of the longest extent, at least two: ``[2, 1]`` on a 35 × 50 × 35 mm
        crop at 1 mm, 8, 4, 2, 1 in-plane and no binning across the 7.7 mm slices of a 256 × 256 × 31
        abdominal scan at 1.25 mm; the factors used are recorded per level, per axis where they differ).
        ``auto`` is the default since, with ``demons_force: auto``, it took CHAOS abdomens from 0.862 to 0.901
        mean Dice (benchmarks/pipeline.py) and leaves crops such as the hippocampus on ``[2, 1]``.
    smoothing_sigmas : list of float, mm
        Gaussian smoothing per level, coarse to fine; with ``auto`` factors a list of another length than
        the levels derived repeats its first (coarsest) entry at the extra coarse levels, or keeps its finest.
    iterations : int or list of int
        Iterations per level (most L-BFGS-B iterations for ``bspline``, demons updates for
        ``demons``): one number for every level, or one per level, coarse to fine (as ANTs'
        ``100x70x50``): the finest level costs the most per iteration and needs the fewest. With
        ``auto`` factors a list is fitted to the levels derived as ``smoothing_sigmas`` is.
    grid_spacing : float, mm
        ``bspline``: control-point spacing at the finest level; the grid is refined by 2
        between levels, so the coarsest level's spacing is ``grid_spacing * 2**(levels-1)``.
    metric : str
        ``bspline``: ``ncc`` (normalised cross-correlation), ``mse`` (mean squared
        difference of the normalised intensities), ``nmse`` (the same after each image is
        standardised to zero mean and unit variance), ``mattes`` (mutual information,
        for different contrasts) or ``ants_ncc`` (ANTs neighbourhood correlation in
        a window of ``ncc_radius`` voxels; uses every voxel).
    sampling_percentage : float
        ``bspline``: fraction of fixed-image voxels sampled for the metric (not ``ants_ncc``).
    regularization : float
        ``bspline``: weight of the membrane energy (mean squared strain between
        neighbouring control points, dimensionless) added to the metric; larger is smoother.
    ncc_radius : int, voxels
        ``ants_ncc`` and ``demons_force: lncc``: window radius (along every axis).
    demons_variant : str
        ``diffeomorphic`` (each step composed onto the field) or ``symmetric`` (each step added:
        cheaper, but folds thick-slice images); both use symmetric forces.
    demons_force : str or list of str
        ``demons``: ``ssd`` (Thirion's demons forces on the intensity differences: for intensities
        that match once normalised) or ``lncc`` (the gradient of the local normalised cross-correlation
        in a window of ``ncc_radius`` voxels, as Greedy's and ANTs' ``CC`` metric: robust to slowly
        varying intensity biases; give it some ``update_sigma``), one for every level or one per level,
        coarse to fine (fitted to ``auto`` factors as ``iterations`` is). ``auto``: ``lncc`` on the
        coarse levels of a scan of a body region (longest extent >= 160 mm, where coil shading varies
        across the field of view and organs' contrast varies between subjects) and ``ssd`` on its full
        resolution level and on crops (whose intensities match once normalised); the choice is recorded
        per level. Each ``lncc`` update (after ``update_sigma``) is scaled so that its 95th percentile
        step is a step size, longer steps cut to that: at most half the smallest voxel (the bound of the
        ``ssd`` steps), halved whenever an update would lower the mean LNCC (it is then undone), so a
        level stops (``converged``) once no step of 1 % of the bound helps.
    field_sigma : float, mm
        ``demons``: Gaussian smoothing of the displacement field after each update (elastic
        regularisation): mm along the image's finest axis, and the same number of voxels along the
        others (on 8 mm slices a field smoothed by 1 mm across slices folds); coarser levels keep
        its width in voxels.
    update_sigma : float, mm
        ``demons``: Gaussian smoothing of each update (fluid regularisation), like ``field_sigma``; 0 turns it off.
        1.7 mm: the ``lncc`` force needs some (its raw gradient is noisy), and with ``ssd`` it gained cardiac
        stacks 0.008 mean Dice and left CHAOS abdomens and hippocampus crops as they were (benchmarks/pipeline.py).
    """

    enabled: bool = True
    method: Literal["bspline", "demons"] = "demons"
    shrink_factors: tuple[int, ...] | Literal["auto"] = "auto"
    smoothing_sigmas: tuple[float, ...] = (0.0, 0.0)
    iterations: int | tuple[int, ...] = (50, 10)
    grid_spacing: float = 6.0
    metric: Literal["ncc", "mse", "nmse", "mattes", "ants_ncc"] = "ncc"
    sampling_percentage: float = 0.25
    regularization: float = 0.1
    ncc_radius: int = 2
    demons_variant: Literal["diffeomorphic", "symmetric"] = "diffeomorphic"
    demons_force: Union[Literal["auto", "ssd", "lncc"], tuple[Literal["ssd", "lncc"], ...]] = "auto"
    field_sigma: float = 1.25
    update_sigma: float = 1.7

    def __post_init__(self):
        _require(self.regularization >= 0, "regularization", "must be >= 0")
        _require(self.grid_spacing > 0, "grid_spacing", "must be > 0 (mm)")
        _require(self.ncc_radius >= 1, "ncc_radius", "must be >= 1 (voxels)")
        _require(self.field_sigma >= 0, "field_sigma", "must be >= 0 (mm)")
        _require(self.update_sigma >= 0, "update_sigma", "must be >= 0 (mm)")
        _check_per_level(self, "demons_force", "force")
        _check_pyramid(self)


@dataclass(frozen=True)
class RegistrationConfig:
    """Affine then non-rigid registration of each atlas onto the target.

    Parameters
    ----------
    normalization : str
        Per-image intensity normalisation before any comparison: ``percentile``
        (0.5th–99.5th percentile mapped to [0, 1] and clipped) or ``none``.
    seed : int
        Seed of the metric's random sampling. The same inputs, config and seed give
        bitwise-identical transforms for a fixed ITK thread count (``parallel.itk_threads``);
        with the ``mattes`` metric only on one thread (ITK adds its per-thread sums in
        whatever order the threads finish). At least 1: SimpleITK reads 0 as "seed from the clock".
    min_overlap : float
        A registration is flagged as failed when less than this fraction of the
        target's foreground maps inside the atlas image.
    max_folded_fraction : float
        A registration is flagged as failed when more than this fraction of the
        target's foreground has a non-positive Jacobian determinant (folding).
    """

    normalization: Literal["percentile", "none"] = "percentile"
    seed: int = 42
    min_overlap: float = 0.5
    max_folded_fraction: float = 0.01
    affine: AffineConfig = field(default_factory=AffineConfig)
    nonrigid: NonrigidConfig = field(default_factory=NonrigidConfig)

    def __post_init__(self):
        _require(
            self.seed >= 1, "seed", "must be >= 1 (an unsigned 32-bit seed; SimpleITK reads 0 as 'seed from the clock')"
        )
        _require(0 <= self.min_overlap <= 1, "min_overlap", "must be in [0, 1]")
        _require(0 <= self.max_folded_fraction <= 1, "max_folded_fraction", "must be in [0, 1]")


@dataclass(frozen=True)
class PropagationConfig:
    """How atlas labels are carried into target space.

    Parameters
    ----------
    interpolator : str
        ``nearest`` (nearest neighbour), ``linear`` (each label's indicator resampled
        linearly, the largest wins: boundaries without the atlas voxels' staircase) or
        ``gaussian`` (the same with a Gaussian of one atlas voxel: SimpleITK's
        ``sitkLabelGaussian``; slower, and it smooths even without motion). Label
        values are never mixed; the pixel type is kept.
    """

    interpolator: Literal["nearest", "linear", "gaussian"] = "nearest"


@dataclass(frozen=True)
class FusionConfig:
    """How candidates become one segmentation: a weighted vote per voxel, or STAPLE.

    Parameters
    ----------
    method : str
        ``majority`` (every candidate weighs 1), ``global_weighted`` (one weight per
        candidate: inverse mean squared intensity difference to the target),
        ``local_weighted`` (a weight per voxel: that difference averaged in a
        Gaussian window), ``jlf`` (joint label fusion, Wang et al. 2013; the default:
        the best of these on MSD hippocampus, MS-CMRSeg cardiac and CHAOS abdomen) or ``staple`` (STAPLE,
        Warfield et al. 2004: each atlas's confusion matrix estimated by EM where
        the atlases disagree; labels only). A tie goes to the smallest label value.
    metric : str
        Intensity difference of ``global_weighted`` and ``local_weighted``: ``mse`` (squared
        difference of the normalised intensities) or ``nmse`` (the same after the target and
        each warped atlas are standardised to zero mean and unit variance over the whole image:
        unchanged by a linear change of either's intensities).
    gain : float
        Power applied to the inverse squared difference; larger trusts the
        best-matching atlas more. Weighted methods only.
    sigma : float, mm
        Gaussian window of ``local_weighted``.
    patch_radius : int (voxels) or ``auto``
        ``jlf``: radius of the patch whose intensity differences give the weights, in voxels
        of the finest axis; along a coarser axis, about the same extent in mm, in whole
        voxels (rounded half up, so possibly 0). ``auto`` (the default): 2, or 3 where the
        smallest structure spans at least 20 voxels of the finest axis (its equivalent-sphere
        diameter, in the best-ranked candidate; :func:`atlasseg.fusion.jlf.auto_radii`);
        recorded in each target's ``fusion`` record.
    alpha : float
        ``jlf``: ridge added to the error matrix (larger is closer to an equal vote).
    beta : float
        ``jlf``: power applied to the patch differences.
    search_radius : int, voxels
        ``jlf``: each atlas's label and patch come from its best-matching patch (least
        squared intensity difference to the target's patch) within this radius of the
        voxel (Wang et al. 2013's local search; counted like ``patch_radius``); 0 takes
        the patch at the voxel itself. ``auto`` (the default): 3, or 5 for structures that
        large (as ``patch_radius``).
    patch_normalization : bool
        ``jlf``: compare patches scaled to zero mean and unit variance (as ANTs does), so
        local contrast differences between atlas and target do not count as errors.
    patch_voting : bool
        ``jlf``: each atlas's weight votes for its labels over the whole patch, not only at
        the patch centre (as ANTs does); each voxel's votes are averaged over the patches
        covering it.
    staple_iterations : int
        ``staple``: most EM iterations.
    staple_tolerance : float
        ``staple``: EM stops once no confusion-matrix entry changes by this much.
    probability_sigma : float, mm
        When above 0, each label's probability map (its share of the vote; STAPLE's
        posterior) is smoothed by a Gaussian of this sigma and the label map is their
        arg-max, a prior that boundaries are smooth; the probability maps written are the
        smoothed ones. It can help large structures on coarse grids and erodes structures
        only a few sigmas thick (``benchmarks/fusion.py`` measures both); choose it with
        ``atlasseg crossval``.
    keep_largest_component : bool
        After fusion, each label keeps only its largest connected component
        (26-connected in 3D, 8 in 2D); the voxels cut off go to the next most
        probable label there, or background where no other label has a vote.
    fill_holes : bool
        After fusion (and ``keep_largest_component``), background enclosed by one
        label (6-connected in 3D, 4 in 2D) becomes that label.
    """

    method: Literal["majority", "global_weighted", "local_weighted", "jlf", "staple"] = "jlf"
    metric: Literal["mse", "nmse"] = "mse"
    gain: float = 1.0
    sigma: float = 2.0
    patch_radius: Union[int, Literal["auto"]] = "auto"
    alpha: float = 0.1
    beta: float = 2.0
    search_radius: Union[int, Literal["auto"]] = "auto"
    patch_normalization: bool = True
    patch_voting: bool = True
    staple_iterations: int = 50
    staple_tolerance: float = 1e-5
    probability_sigma: float = 0.0
    keep_largest_component: bool = False
    fill_holes: bool = False

    def __post_init__(self):
        _require(
            self.patch_radius == "auto" or self.patch_radius >= 0, "patch_radius", "must be >= 0 (voxels) or 'auto'"
        )
        _require(self.alpha > 0, "alpha", "must be > 0")
        _require(self.beta > 0, "beta", "must be > 0")
        _require(
            self.search_radius == "auto" or self.search_radius >= 0, "search_radius", "must be >= 0 (voxels) or 'auto'"
        )
        _require(self.gain >= 0, "gain", "must be >= 0")
        _require(self.sigma > 0, "sigma", "must be > 0 (mm)")
        _require(self.staple_iterations >= 1, "staple_iterations", "must be >= 1")
        _require(self.staple_tolerance >= 0, "staple_tolerance", "must be >= 0")
        _require(self.probability_sigma >= 0, "probability_sigma", "must be >= 0 (mm)")


@dataclass(frozen=True)
class EvaluationConfig:
    """Scoring against ground truth, when a target has it.

    Parameters
    ----------
    metrics : list of str
        Per label: ``dice``, ``jaccard``, ``hd95`` (mm), ``assd`` (mm),
        ``volume_difference`` (ml); Dice is always computed.
    """

    metrics: tuple[Literal["dice", "jaccard", "hd95", "assd", "volume_difference"], ...] = (
        "dice",
        "jaccard",
        "hd95",
        "assd",
        "volume_difference",
    )


@dataclass(frozen=True)
class QualityConfig:
    """A predicted Dice per target and label, for targets without ground truth (:mod:`atlasseg.quality`).

    Parameters
    ----------
    enabled : bool
        Predict each label's Dice from what the run has (the candidates' agreement with the
        fused result and with each other, the fusion's probabilities at its boundary, how far the
        registered atlases' intensities differ from the target's within 3 mm of the label), with a
        regression calibrated on atlases segmented by the other atlases with the same config;
        written to ``metrics.csv`` and ``run.json``. The calibration
        costs about as much as segmenting ``calibration_atlases`` more targets, once per
        atlas set and config (its result is cached).
    calibration_atlases : int
        Most atlases segmented by the others to calibrate the prediction (chosen evenly
        over the atlases sorted by id; all of them when there are fewer).
    review_quantile : float, in (0, 1)
        A label gets ``review: true`` when its predicted Dice is below this quantile of the
        calibration samples' predicted Dice (each sample predicted by the fit without it,
        pooled over labels): a threshold relative to what this atlas set and config achieve
        on the calibration atlases, so that about this share of labels segmented like theirs
        is flagged, whatever the anatomy. 0.15 flags half as many again as the worst tenth of
        the labels, the share worth a look: with the worst tenth all caught, 6 % of the others
        are flagged, which leaves room, within one false alarm in five, for a ranking that
        misses some and for a threshold estimated from a few dozen calibration samples. Unused
        when ``review_below`` is set. The report lists targets with a flagged label first.
    review_below : float or null
        An absolute threshold instead (a Dice): a label predicted below it gets ``review: true``.
        No one value suits every anatomy (a cardiac myocardium's good Dice is a hippocampus's
        poor one); null (the default) takes ``review_quantile``. run.json's ``quality.review``
        records the rule and the threshold the run used.
    """

    enabled: bool = False
    calibration_atlases: int = 8
    review_quantile: float = 0.15
    review_below: float | None = None

    def __post_init__(self):
        _require(self.calibration_atlases >= 3, "calibration_atlases", "must be >= 3")
        _require(0.0 < self.review_quantile < 1.0, "review_quantile", "must be in (0, 1)")
        _require(
            self.review_below is None or 0.0 <= self.review_below <= 1.0,
            "review_below",
            "must be null or a Dice, in [0, 1]",
        )


@dataclass(frozen=True)
class ParallelConfig:
    """Parallel registration of the atlases.

    Parameters
    ----------
    n_jobs : int
        Parallel registrations; -1 means one per available core.
    backend : str
        ``loky`` (joblib processes on this machine), ``threading`` (joblib threads) or
        ``dask`` (a Dask cluster: the one at ``scheduler``, or a local one started for the
        run; needs ``pip install 'atlasseg[dask]'``).
    scheduler : str or None
        Address of a running Dask scheduler, e.g. ``tcp://10.0.0.5:8786`` (``backend: dask``
        only). Its workers need atlasseg installed and the manifest's files at the same paths.
    itk_threads : int
        ITK threads per job; 0 shares the cores evenly (jobs × threads ≤ cores; 1 per job on
        a remote Dask cluster, whose workers run one job per worker thread).
    """

    n_jobs: int = -1
    backend: Literal["loky", "threading", "dask"] = "loky"
    scheduler: Optional[str] = None
    itk_threads: int = 0

    def __post_init__(self):
        _require(self.n_jobs == -1 or self.n_jobs >= 1, "n_jobs", f"must be >= 1 or -1, got {self.n_jobs}")
        _require(self.itk_threads >= 0, "itk_threads", "must be >= 0")
        _require(self.scheduler is None or self.backend == "dask", "scheduler", "needs backend: dask")


@dataclass(frozen=True)
class OutputConfig:
    """What a run writes.

    Parameters
    ----------
    dir : str
        Output folder (relative to the working directory) unless ``--out`` is given.
    format : str
        File format of the images written, by extension: ``nii.gz`` (NIfTI, compressed), ``nii``,
        ``nrrd``, ``mha`` (MetaImage) or ``mgz`` (FreeSurfer; 3D only). Every format keeps the
        geometry and the label values and type (MGH widens int8 to int16 and uint32 to int32).
    save_transforms : bool
        Also write each atlas's composed transform as ``<target>/transforms/<atlas>.h5`` (ITK's HDF5
        composite: read by ``SimpleITK.ReadTransform`` and ANTs' ``antsApplyTransforms``).
    probability_maps : bool
        Also write ``<target>/probability_<label>.<format>``: each label's share of the vote.
    cache : bool
        Keep every registration's result in the cache folder and reuse it in later runs
        whose inputs, registration config and atlasseg version are the same (another
        fusion method, ``k``, evaluation, or a run resumed after it was stopped).
    cache_dir : str or None
        The cache folder; unset: ``$ATLASSEG_CACHE_DIR``, else ``~/.cache/atlasseg``.
        A run reads and writes entries of a few times an image's size per registration;
        ``atlasseg cache info|prune|clear`` shows and frees them.
    cache_max_gb : float or None, GiB
        Size cap of the cache folder: after each target, the least recently used entries are removed
        until it fits (never one used in the last 10 minutes, or by the target being segmented);
        ``atlasseg cache prune`` does the same at once. Null: no cap.
    layout : str
        Where the segmentations go: ``default`` (``<target>/segmentation.<format>``, and
        ``<target>/probability_<label>.<format>``) or ``bids``, for targets whose ids are BIDS
        names (``sub-<label>[_ses-<label>]``, as ``atlasseg manifest from-bids`` writes them): the
        output folder becomes a BIDS derivatives dataset, with
        ``sub-<label>/[ses-<label>/]anat/<id>_desc-atlasseg_dseg.<format>`` (and
        ``<id>_label-<name>_desc-atlasseg_probseg.<format>``), ``dseg.tsv`` (the label names),
        ``dataset_description.json`` and a ``.bidsignore`` for atlasseg's other files.
    report : bool
        Also write the QC report: ``<target>/qc.png`` (the segmentation's contours, and the ground
        truth's, over the target on three orthogonal slices), ``index.html`` (metrics, pictures, an
        interactive view per target, atlas rankings, registration records), the view's volumes
        (``<target>/viewer.js``) and viewer (``viewer/``), and ``<target>/disagreement.<format>``: the
        share of the candidates that vote against the most voted label, voxel by voxel (0–1);
        ``atlasseg report`` rewrites the report from ``run.json``.
    """

    dir: str = "atlasseg-out"
    format: Literal["nii.gz", "nii", "nrrd", "mha", "mgz"] = "nii.gz"
    save_transforms: bool = False
    probability_maps: bool = False
    cache: bool = True
    cache_dir: Optional[str] = None
    cache_max_gb: Optional[float] = 20.0
    layout: Literal["default", "bids"] = "default"
    report: bool = True

    def __post_init__(self):
        _require(
            self.cache_max_gb is None or self.cache_max_gb > 0,
            "cache_max_gb",
            f"must be > 0 (GiB) or null for no cap, got {self.cache_max_gb}",
        )


@dataclass(frozen=True)
class Config:
    """The whole run configuration."""

    selection: SelectionConfig = field(default_factory=SelectionConfig)
    registration: RegistrationConfig = field(default_factory=RegistrationConfig)
    propagation: PropagationConfig = field(default_factory=PropagationConfig)
    fusion: FusionConfig = field(default_factory=FusionConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain, YAML/JSON-ready form (tuples as lists)."""
        return _plain(dataclasses.asdict(self))


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# Upper bound of every integer key (and of each entry of a list of integers), by section class and key: far
# above any useful value, and below what SimpleITK's C++ types (32-bit iteration counts, unsigned seeds) or the
# memory a window or a pyramid needs can hold. The lower bounds are the sections' own checks.
INT_LIMITS: dict[type, dict[str, int]] = {
    SelectionConfig: {"k": 100_000, "min_atlases": 100_000, "prescreen": 100_000},
    AffineConfig: {"shrink_factors": 1024, "iterations": 100_000, "max_samples": 10**9},
    NonrigidConfig: {"shrink_factors": 1024, "iterations": 100_000, "ncc_radius": 50},
    RegistrationConfig: {"seed": 2**32 - 1},
    FusionConfig: {"patch_radius": 50, "search_radius": 50, "staple_iterations": 100_000},
    ParallelConfig: {"n_jobs": 4096, "itk_threads": 4096},
    QualityConfig: {"calibration_atlases": 10_000},
}


def _check_limit(cls, name: str, value, key: str) -> None:
    limit = INT_LIMITS.get(cls, {}).get(name)
    for number in value if isinstance(value, tuple) else (value,):
        if limit is not None and isinstance(number, int) and not isinstance(number, bool) and number > limit:
            raise _FieldError(key, f"must be <= {limit}, got {short_repr(number)}")


# --------------------------------------------------------------------------- loading

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = _REPR.maxlong = 60
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 4, 4, 4


def short_repr(value) -> str:
    """``repr(value)`` cut to a readable length however large or deeply nested ``value`` is (for messages)."""
    try:
        return _REPR.repr(value)
    except ValueError:  # an integer too long for Python to print
        return "<a number too long to show>"


#: Nodes a YAML document may gain through aliases (``*name``): an "alias bomb" (a few lines whose aliases nest
#: into billions of nodes) is refused; real configs and manifests use none or a handful.
ALIAS_BUDGET = 10_000


class YAMLRefused(yaml.YAMLError):
    """A YAML document refused before it is built: aliases expanding beyond :data:`ALIAS_BUDGET`, a recursive
    alias, nesting too deep, or a value its constructor rejects (e.g. an integer of thousands of digits)."""

    def __init__(self, problem: str, mark=None):
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing documents that :func:`_check_expansion` finds too large once expanded."""

    def construct_document(self, node):
        _check_expansion(node)
        return super().construct_document(node)


def _check_expansion(root) -> None:
    """Count the nodes of ``root`` with every alias expanded, each node once (memoised), and stop as soon as a
    subtree exceeds the distinct nodes seen by more than :data:`ALIAS_BUDGET`."""
    sizes: dict[int, int | None] = {}  # id(node) → expanded size; None while being counted (a cycle if met)

    def size(node) -> int:
        if id(node) in sizes:
            if sizes[id(node)] is None:
                raise YAMLRefused("a recursive alias (a node that contains itself)", node.start_mark)
            return sizes[id(node)]
        sizes[id(node)] = None
        children = (
            node.value
            if isinstance(node, yaml.SequenceNode)
            else ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        )
        total = 1 + sum(size(child) for child in children)
        if total > len(sizes) + ALIAS_BUDGET:
            raise YAMLRefused(
                f"aliases expand to more than {ALIAS_BUDGET} extra nodes (an alias bomb?); write the values out",
                node.start_mark,
            )
        sizes[id(node)] = total
        return total

    size(root)


def load_yaml(text: str):
    """The one YAML loader for what atlasseg reads (configs, manifests, ``--set`` values): safe (plain data only)
    and bounded (see :class:`YAMLRefused`); raises ``yaml.YAMLError``."""
    try:
        return yaml.load(text, Loader=_BoundedLoader)
    except RecursionError:
        raise YAMLRefused("nested too deeply") from None
    except (ValueError, OverflowError) as err:  # constructors: an integer of > 4300 digits, a date "2001-13-45"
        raise YAMLRefused(f"cannot read a value ({str(err)[:100]})") from None


def read_yaml(file: Path, *, error: type[Exception], what: str):
    """:func:`load_yaml` of a file; unreadable files and invalid YAML raise ``error`` naming the file and
    (where known) the line."""
    try:
        return load_yaml(file.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise error(f"{file}: invalid YAML{where}: {getattr(err, 'problem', None) or err}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise error(f"{file}: cannot read {what}: {err}") from None


def type_name(tp) -> str:
    """A config type as users read it ('a' or 'b', list of float, …): in errors and in docs/config.md."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"list of {type_name(typing.get_args(tp)[0])}"
    if dataclasses.is_dataclass(tp):
        return "mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


class _Mismatch(_FieldError):
    """A value of the wrong type; its message is built only when shown, from a :func:`short_repr` of the value."""

    def __init__(self, tp, value, key: str):
        ConfigError.__init__(self, key)
        self.name, self._tp, self._value = key, tp, value

    @property
    def message(self) -> str:
        return f"expected {type_name(self._tp)}, got {short_repr(self._value)}"

    def __str__(self) -> str:
        return f"{self.name}: {self.message}"


def _coerce(tp, value, key: str):
    """Check ``value`` against annotation ``tp``; return it in canonical form or raise ``_FieldError``."""
    origin = typing.get_origin(tp)
    bad = _Mismatch(tp, value, key)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) is not bool:
            return value
        raise bad
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(option, value, key)
            except _FieldError:
                continue
        raise bad
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad
        (item,) = typing.get_args(tp)[:1]
        return tuple(_coerce(item, v, f"{key}[{i}]") for i, v in enumerate(value))
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range
            number = math.inf
        if not math.isfinite(number):  # no key has a use for NaN or infinity; ITK and numpy fail on them late
            raise _FieldError(key, f"must be a finite number, got {short_repr(value)}")
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported config annotation {tp!r}")  # a programming error, not user input


def _build(cls, data, prefix: str = ""):
    if data is None:
        data = {}
    where = prefix or "the top level"
    if not isinstance(data, dict):
        raise _FieldError(prefix or "config", f"expected a mapping, got {short_repr(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            full = f"{prefix}.{key}" if prefix else str(key)
            raise _FieldError(
                full if len(full) <= 80 else full[:80] + "...", f"unknown key in {where} (known: {', '.join(names)})"
            )
    kwargs = {k: _coerce(hints[k], v, f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    for k, v in kwargs.items():
        _check_limit(cls, k, v, f"{prefix}.{k}" if prefix else k)
    try:
        return cls(**kwargs)
    except _FieldError as err:
        if "." in err.name or not prefix:
            raise
        raise _FieldError(f"{prefix}.{err.name}", err.message) from None


def config_from_dict(data: dict, *, source: str = "<config>", overrides: typing.Sequence[str] = ()) -> Config:
    """Build a validated :class:`Config` from a nested mapping and ``--set`` overrides (``section.key=value``);
    errors name ``source``. ``data`` is not modified."""
    if overrides:
        data = copy.deepcopy(data)
        for text in overrides:
            keys, value = parse_override(text)
            _apply_override(data, keys, value, text)
        source = f"{source} with --set"
    try:
        return _build(Config, data)
    except _FieldError as err:
        raise ConfigError(f"{source}: {err.name}: {err.message}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split ``section.key=value`` into the key path and the YAML-parsed value."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {text!r}: expected section.key=value")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"--set {text!r}: value is not valid YAML") from None
    return key.strip().split("."), value


def _apply_override(data: dict, path: list[str], value, text: str) -> None:
    node = data
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {text!r}: {part} is not a section")
        node = child
    node[path[-1]] = value


PRESETS = ("default", "fast", "accurate", "demo", "baseline")


# Installed wheels carry configs/ as atlasseg/configs/; a source checkout has it beside the package.
_PRESET_DIRS = (Path(__file__).parent / "configs", Path(__file__).resolve().parent.parent / "configs")


def preset_path(name: str) -> Path:
    """Path of a shipped preset config (``configs/<name>.yaml``)."""
    for folder in _PRESET_DIRS:
        if (folder / f"{name}.yaml").is_file():
            return folder / f"{name}.yaml"
    raise ConfigError(
        f"preset {name!r} is missing from this installation (looked in {', '.join(map(str, _PRESET_DIRS))})"
    )


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file path as given, or a shipped preset by name (``default``, ``demo``, …)."""
    path = Path(name_or_path)
    if path.exists():
        return path
    if str(name_or_path) in PRESETS:
        return preset_path(str(name_or_path))
    raise ConfigError(f"{name_or_path}: config file not found (or a preset: {', '.join(PRESETS)})")


def load_config(path: str | Path | None = None, *, overrides: typing.Sequence[str] = ()) -> Config:
    """Load a YAML config (a path or a preset name; ``None`` for the defaults) and apply ``--set`` overrides."""
    data: dict = {}
    source = "<defaults>"
    if path is not None:
        file = resolve_config_path(path)
        source = str(file)
        if file.is_dir():
            raise ConfigError(f"{file}: is a directory, expected a YAML config file")
        data = read_yaml(file, error=ConfigError, what="config") or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{file}: expected a mapping of sections at the top level")
    return config_from_dict(data, source=source, overrides=overrides)
