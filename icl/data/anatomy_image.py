"""Images synthesised from anatomy label maps, with randomised contrast, resolution and artefacts (SynthSeg-style).

Why: SynthSeg (Billot et al. 2023) trains on nothing but images drawn from label maps with random per-structure
intensities and random acquisition artefacts, so no one contrast is learnt as "the" look of a structure. Here each
structure's mean comes from a random mixture: a few tissue classes shared by many structures (neighbours of one
class differ only by a small jitter: almost no contrast), or, in some draws, a mean of its own (strong contrast).
Then texture inside structures, partial volume (blur, optional through-plane blur of thick slices), a random lower
in-plane resolution, a multiplicative bias field, Gaussian or Rician noise, MR-like percentile scaling to [0, 1]
(the pipeline's own ``MR_PERCENTILES``) and a random gamma. The background outside the body holds clutter.

:func:`render` returns the image and the means it drew, so tests (and task generators) can relate them to labels.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from icl.data.anatomy import smooth_fields
from icl.data.frames import MR_PERCENTILES

#: what :func:`render` can leave out, one at a time (the generator's ablation, ``-anatomy_drop``)


def structure_means(rng: np.random.Generator, kinds: list[str], drop: frozenset = frozenset()) -> np.ndarray:
    """One mean intensity per id (index 0 = background outside the body), in about [0, 1] before scaling."""
    n = len(kinds)
    if rng.random() < 0.3 or "weak_contrast" in drop:  # every structure its own mean: strong contrast everywhere
        means = rng.uniform(0.05, 1.0, n)
    else:  # a few tissue classes, each structure one of them plus a small jitter: weak contrast between neighbours
        tissues = rng.uniform(0.05, 1.0, int(rng.integers(2, 7)))
        jitter = rng.uniform(0.0, 0.08)
        means = tissues[rng.integers(len(tissues), size=n)] + rng.normal(0, jitter, n)
    for i, kind in enumerate(kinds):
        if kind == "rim" and rng.random() < 0.7 and "rim" not in drop:  # a bright rim, skull- or body-wall-like
            means[i] = rng.uniform(0.85, 1.2)
    means[0] = rng.uniform(0.0, 0.1) if rng.random() < 0.8 else rng.uniform(0.0, 0.5)  # mostly dark outside
    return means.astype(np.float32)


def _clutter(rng: np.random.Generator, labels: np.ndarray, image: np.ndarray) -> None:
    """Blobs outside the body (tables, coils, other body parts cut by the field of view), in place."""
    if rng.random() < 0.4:
        return
    depth, size = labels.shape[0], labels.shape[-1]
    blobs = smooth_fields(rng, 1, (max(2, depth // 3), 6, 6), (depth, size, size))[0].numpy()
    where = (blobs > rng.uniform(0.8, 1.6)) & (labels == 0)
    image[where] = rng.uniform(0.1, 0.9) + 0.05 * blobs[where]


def _resample_in_plane(image: np.ndarray, factor: float) -> np.ndarray:
    """Acquire at ``factor`` x coarser in-plane resolution, then back to the grid (linear): a low-res scan."""
    small = ndimage.zoom(image, (1, 1 / factor, 1 / factor), order=1, grid_mode=True, mode="nearest")
    return ndimage.zoom(small, np.array(image.shape) / np.array(small.shape), order=1, grid_mode=True,
                        mode="nearest")


def scale_to_unit(image: np.ndarray) -> np.ndarray:
    """MR-like scaling: the volume's MR_PERCENTILES to [0, 1], clipped (what preprocessing does to real MR)."""
    lo, hi = np.percentile(image, MR_PERCENTILES)
    return np.clip((image - lo) / max(hi - lo, 1e-6), 0, 1)


def render(rng: np.random.Generator, labels: np.ndarray, kinds: list[str], means: np.ndarray | None = None,
           artefacts: bool = True, drop: frozenset = frozenset()) -> tuple[np.ndarray, np.ndarray]:
    """An image float32 [Z, H, W] in [0, 1] of ``labels`` and the per-id means used (drawn unless given).

    ``artefacts=False``: means and texture only, before scaling (for checking label/image agreement). ``drop``:
    parts of :data:`RENDER_PARTS` left out (an ablation)."""
    means = structure_means(rng, kinds, drop) if means is None else np.asarray(means, np.float32)
    depth, size = labels.shape[0], labels.shape[-1]
    texture_sd = rng.uniform(0.0, 0.06 * ("texture" not in drop), len(means)).astype(np.float32)
    grain = rng.uniform(0.5, 2.0)
    texture = ndimage.gaussian_filter(rng.standard_normal(labels.shape).astype(np.float32), (0, grain, grain))
    texture /= texture.std() + 1e-6
    image = means[labels] + texture_sd[labels] * texture
    if not artefacts:
        return image.astype(np.float32), means
    if "clutter" not in drop:
        _clutter(rng, labels, image)
    blur = rng.uniform(0.0, 1.0)  # partial volume in-plane; thick slices mix neighbours along z
    blur_z = rng.uniform(0.0, 0.7) if rng.random() < 0.4 else 0.0
    if (blur > 0.1 or blur_z > 0.1) and "blur" not in drop:
        image = ndimage.gaussian_filter(image, (blur_z, blur, blur))
    if rng.random() < 0.5 and "lowres" not in drop:
        image = _resample_in_plane(image, rng.uniform(1.2, 2.5))
    if "bias" not in drop:
        bias = rng.uniform(0.0, 0.4)
        field = smooth_fields(rng, 1, (2, 3, 3), (depth, size, size))[0].numpy()
        image = image * np.exp(bias * field)
    if "noise" not in drop:
        sigma = rng.uniform(0.005, 0.06)
        noise = rng.normal(0, sigma, (2, *labels.shape)).astype(np.float32)
        if rng.random() < 0.5:  # Rician: the magnitude of a complex signal with Gaussian noise in both channels
            image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
        else:
            image = image + noise[0]
    gamma = 1.0 if "gamma" in drop else np.exp(rng.normal(0, 0.25))
    image = scale_to_unit(image) ** gamma
    return image.astype(np.float32), means
