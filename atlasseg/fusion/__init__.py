"""Label fusion: candidates (atlas labels in target space) become one segmentation.

Most methods here are a weighted vote: each candidate adds its weight to the label
it shows at each voxel, and the label with the most weight wins (a tie goes to the
smallest label value, background 0 first). The methods differ in the weight:

- ``majority``: 1 for every candidate;
- ``global_weighted``: one weight per candidate, the inverse mean squared intensity
  difference between the warped atlas and the target, to the power ``gain``;
- ``local_weighted``: a weight per voxel, the inverse of that squared difference
  averaged in a Gaussian window (``sigma``, mm), to the power ``gain``
  (Artaechevarria et al. 2009, local weighted voting); with ``metric: nmse`` both
  weights compare the images standardised to zero mean and unit variance;
- ``jlf``: joint label fusion (Wang et al. 2013), weights per voxel that account
  for atlases making the same errors (see :class:`JointLabelFusion`).

``staple`` is not a vote: it estimates each candidate's confusion matrix by
expectation-maximisation and takes the most probable true label (Warfield et al.
2004, multi-label; see :class:`Staple`). It uses labels only, no intensities.

Fusers take candidates one by one: ``add`` each candidate, then ``result``. The
voting methods stream, so their memory does not grow with the number of atlases;
joint label fusion needs all candidates together, so beyond a memory budget it keeps
them on disk and reads them back a slab at a time, and STAPLE keeps each candidate only
where the candidates disagree.

Its modules: :mod:`~atlasseg.fusion.base` (the :class:`Fuser` interface and the shared vote),
:mod:`~atlasseg.fusion.votes` (majority and weighted votes), :mod:`~atlasseg.fusion.jlf`,
:mod:`~atlasseg.fusion.staple`, :mod:`~atlasseg.fusion.postprocess` (largest component, holes) and
:mod:`~atlasseg.fusion.registry` (the fusers by ``fusion.method``, :func:`make_fuser`, :func:`fuse`).
"""

from .base import Fuser
from .jlf import JointLabelFusion
from .postprocess import fill_holes, keep_largest_component, postprocess
from .registry import FUSERS, METHODS, fuse, make_fuser, needs_intensities
from .staple import Staple
from .votes import INTENSITIES, WeightedVote

__all__ = [
    "FUSERS",
    "INTENSITIES",
    "METHODS",
    "Fuser",
    "JointLabelFusion",
    "Staple",
    "WeightedVote",
    "fill_holes",
    "fuse",
    "keep_largest_component",
    "make_fuser",
    "needs_intensities",
    "postprocess",
]
