"""Random inputs shared by the application tests: a strongly varying spatial
kernel and noisy image, variance and mask planes."""

import numpy as np

import gpumatch as gm
from gpumatch.spatial import SpatialFunctions


def random_kernel(rng, k, model_type, order, region, support=None, scale=None):
    """A spatial kernel whose basis images do not sum to zero.

    So the kernel sum, and with it the normalisation, varies across the image.
    ``support`` (bool ``k x k``) zeroes basis pixels; ``scale`` (pixels) makes
    raw-coordinate "polynomial" terms O(1) (default: the region's extent).
    """
    h = k // 2
    v, u = np.mgrid[-h:h + 1, -h:h + 1]
    nb = 4
    basis = np.empty((nb, k, k))
    basis[0] = np.exp(-(u ** 2 + v ** 2) / (2 * 1.5 ** 2))
    for b in range(1, nb):
        basis[b] = rng.normal(0.0, 0.05, (k, k)) + 0.3 * np.exp(
            -((u - rng.integers(-h, h + 1)) ** 2 + (v - rng.integers(-h, h + 1)) ** 2) / 2.0)
    if support is not None:
        basis *= support
    basis[0] /= basis[0].sum()
    nkt = (order + 1) * (order + 2) // 2
    coeffs = rng.uniform(-0.5, 0.5, (nb, nkt))
    coeffs[0] = 0.0
    coeffs[0, 0] = 1.0
    coeffs[1:, 0] = rng.uniform(0.2, 0.4, nb - 1)
    if model_type == "polynomial":
        if scale is None:
            scale = max(region.width, region.height) + abs(region.x0) + abs(region.y0)
        expo = [(n - c, c) for n in range(order + 1) for c in range(n + 1)]
        coeffs = coeffs / np.array([float(scale) ** (a + c) for a, c in expo])
    return gm.SpatialKernel(basis, SpatialFunctions(model_type, order, region), coeffs)


def random_planes(rng, shape, img_dtype=np.float32, var_dtype=np.float32, mask_dtype=np.int32):
    """Image (100 +- 10), variance (5 .. 15) and a mask with one of bits 0-7 set
    on 3 % of the pixels."""
    image = rng.normal(100.0, 10.0, shape).astype(img_dtype)
    variance = rng.uniform(5.0, 15.0, shape).astype(var_dtype)
    mask = np.zeros(shape, dtype=mask_dtype)
    hit = rng.random(shape) < 0.03
    mask[hit] = (1 << rng.integers(0, 8, hit.sum())).astype(mask_dtype)
    return image, variance, mask
