"""Synthetic head-CT studies in the RSNA 2019 Kaggle layout: the embedded data set of the demo and tests.

Three layers, kept apart (the math first, the I/O last):

1. **plan** (:func:`plan_dataset`): every random choice (anatomy, lesions, ids, DICOM style) is drawn from
   one ``np.random.default_rng(spec.seed)`` into frozen :class:`StudyPlan` objects, in a fixed order.
2. **phantom** (:func:`phantom_slice`, :func:`render_slice`): pure functions from a
   plan and a slice index to HU, blood masks and labels. The noise of a slice comes from
   ``default_rng([plan.noise_seed, k])``, so a slice renders the same every time, in any order.
3. **I/O** (:func:`make_dataset`): DICOM files and the Kaggle CSVs, each written atomically.

Geometry. Slice ``k`` of a study (``0`` = skull base, ``n-1`` = vertex) sits at the anatomical height
``t = t0 + (t1 - t0) k / (n - 1)`` in [0, 1]. In-plane coordinates are millimetres in the *head frame*
(``u`` to the patient's left = image right, ``v`` posterior = image down), a rotated, shifted copy of
the pixel grid. Layers are concentric ellipses: scalp, skull (thicker at the base), then the cranial
cavity holding cortex, white matter, deep grey nuclei, sulci, the interhemispheric fissure, ventricles
and basal cisterns (CSF), all shrinking toward base and vertex.

Hemorrhage (55–80 HU in the ``classic`` family; :data:`FAMILIES` holds the others) is a
:class:`Lesion` with a centre height and a half z-extent; its in-plane size
follows ``sqrt(1 - (dz / z_half)^2)``, so it grows and shrinks smoothly over several slices. A slice is
positive for a subtype when that lesion's mask there covers at least :func:`min_visible_px` pixels.

Pixel layouts (``StudyPlan.layout``), all with RescaleSlope 1:

============  =========  =======  ======  =========  =======================================
layout        BitsStored HighBit  PixRep  Intercept  stored value
============  =========  =======  ======  =========  =======================================
signed16      16         15       1       -1024      HU + 1024 (int16)
unsigned12    12         11       0       -1024      clip(HU + 1024, 0, 4095)
rsna12        12         11       0       0          HU mod 4096 (the RSNA quirk; see below)
============  =========  =======  ======  =========  =======================================

``rsna12`` mimics the broken files of the challenge: read naively (intercept 0) air shows at ~3096 HU.
The community fix (BitsStored 12, PixelRepresentation 0, intercept > -100: ``x = raw + 1000``, subtract
4096 where ``x >= 4096``, intercept -1000) restores HU exactly, because every phantom HU is in
[-1000, 3071].
"""

from __future__ import annotations

from ichdet.synth.phantom import min_visible_px, phantom_slice, render_slice
from ichdet.synth.plan import plan_dataset, visible_slices
from ichdet.synth.spec import (
    FAMILIES,
    HU_RANGE,
    INSTANCE_ORDERS,
    KINDS,
    LAYOUTS,
    Anatomy,
    DicomStyle,
    Family,
    Layout,
    Lesion,
    PhantomSlice,
    StudyPlan,
    SynthSpec,
    SynthSummary,
)
from ichdet.synth.writer import build_dataset, encode_pixels, make_dataset

__all__ = [
    "FAMILIES",
    "HU_RANGE",
    "INSTANCE_ORDERS",
    "KINDS",
    "LAYOUTS",
    "Anatomy",
    "DicomStyle",
    "Family",
    "Layout",
    "Lesion",
    "PhantomSlice",
    "StudyPlan",
    "SynthSpec",
    "SynthSummary",
    "build_dataset",
    "encode_pixels",
    "make_dataset",
    "min_visible_px",
    "phantom_slice",
    "plan_dataset",
    "render_slice",
    "visible_slices",
]
