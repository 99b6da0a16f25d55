"""Synthetic large motion: layered scenes cut from real images, rendered at t = 0, 0.5, 1.

FILM's claim is motion up to 100 px and more, which short real clips rarely show.
Here a scene is a background plus up to ``max_layers`` foreground cut-outs, each
texture cut from a real frame, each moving with its own linear motion::

    centre(t) = c + v * (t - 1/2),  angle(t) = a + w * (t - 1/2),  scale(t) = s * (1 + z * (t - 1/2))

for t in {0, 1/2, 1}. So the middle frame is an exact rendering of the same
scene at t = 1/2 (not an interpolation), and layers occlude one another and
reveal the background (the hard case for interpolation).

Rendering is a backward map per layer: every output pixel q is sent to texture
coordinates ``u = c_tex + R(-angle) (q - centre) / scale`` and sampled
bilinearly (``grid_sample``); the layer's soft alpha mask (random ellipses, a
1-2 px antialiased edge) is sampled by the same map, so the shape moves with its
texture. Layers are composited back to front, ``img = a * layer + (1 - a) * img``.

Motion: the speed |v| is uniform in [0, 8] px with probability 0.3 (small motion
still dominates real video) and otherwise uniform in [0, max_motion]; the
background moves at up to half that. Directions are uniform.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

Triplet = Tuple[torch.Tensor, torch.Tensor, torch.Tensor]
TIMES = (0.0, 0.5, 1.0)


class SceneGenerator:
    """Renders random layered scenes; see the module docstring.

    Args:
        textures: ``[H, W, 3]`` uint8 real images to cut layers from.
        max_motion: largest foreground displacement between t = 0 and t = 1, pixels
            at the rendered size.
        max_layers: foreground layers per scene are uniform in ``0..max_layers``.
    """

    def __init__(self, textures: Sequence[torch.Tensor], max_motion: float = 64.0,
                 max_layers: int = 4) -> None:
        self.textures = list(textures)
        if not self.textures:
            raise ValueError("SceneGenerator needs at least one texture image")
        for k, t in enumerate(self.textures):
            if t.dim() != 3 or t.shape[-1] != 3 or t.dtype != torch.uint8:
                raise ValueError(f"texture {k}: expected an [H, W, 3] uint8 tensor, "
                                 f"got {list(t.shape)} {t.dtype}")
        if max_motion < 0:
            raise ValueError(f"max_motion must be >= 0, got {max_motion}")
        self.max_motion = float(max_motion)
        self.max_layers = int(max_layers)

    # ---- pieces ----------------------------------------------------------------------------
    def _texture(self, rng: np.random.Generator, h: int, w: int) -> torch.Tensor:
        """A random ``[3, h, w]`` float crop of a random texture (resized if the image is small)."""
        src = self.textures[int(rng.integers(0, len(self.textures)))]
        sh, sw = src.shape[:2]
        ch, cw = min(h, sh), min(w, sw)
        top = int(rng.integers(0, sh - ch + 1))
        left = int(rng.integers(0, sw - cw + 1))
        patch = src[top:top + ch, left:left + cw].permute(2, 0, 1).float().div_(255.0)
        if (ch, cw) != (h, w):
            patch = F.interpolate(patch[None], size=(h, w), mode="bilinear", align_corners=False)[0]
        if rng.integers(0, 2):
            patch = torch.flip(patch, dims=(-1,))
        return patch

    @staticmethod
    def _mask(rng: np.random.Generator, h: int, w: int) -> torch.Tensor:
        """A ``[1, h, w]`` soft alpha: the union of 1-3 random ellipses inside the patch."""
        yy = torch.arange(h, dtype=torch.float32)[:, None] + 0.5
        xx = torch.arange(w, dtype=torch.float32)[None, :] + 0.5
        alpha = torch.zeros(h, w)
        for _ in range(int(rng.integers(1, 4))):
            cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
            ry, rx = rng.uniform(0.15, 0.5) * h, rng.uniform(0.15, 0.5) * w
            phi = rng.uniform(0, math.pi)
            dy, dx = yy - cy, xx - cx
            u = (dx * math.cos(phi) + dy * math.sin(phi)) / rx
            v = (-dx * math.sin(phi) + dy * math.cos(phi)) / ry
            r = torch.sqrt(u * u + v * v)
            # Signed distance to the ellipse edge in pixels, roughly; a ~1.5 px ramp antialiases.
            edge = (1.0 - r) * min(rx, ry) / 1.5
            alpha = torch.maximum(alpha, edge.clamp(0.0, 1.0))
        return alpha[None]

    def _speed(self, rng: np.random.Generator, limit: float) -> Tuple[float, float]:
        speed = rng.uniform(0.0, min(8.0, limit)) if rng.uniform() < 0.3 else rng.uniform(0.0, limit)
        direction = rng.uniform(0.0, 2.0 * math.pi)
        return speed * math.cos(direction), speed * math.sin(direction)

    @staticmethod
    def _grid(size: int, tex_h: int, tex_w: int, centre: Tuple[float, float], angle: float,
              scale: float) -> torch.Tensor:
        """``[1, size, size, 2]`` normalised texture coordinates of every output pixel."""
        q = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
        qy, qx = torch.meshgrid(q, q, indexing="ij")
        dx, dy = qx - centre[0], qy - centre[1]
        cos, sin = math.cos(angle), math.sin(angle)
        ux = (cos * dx + sin * dy) / scale + tex_w / 2.0  # R(-angle) (q - centre) / scale + c_tex
        uy = (-sin * dx + cos * dy) / scale + tex_h / 2.0
        # align_corners=False: texture pixel edges at 0 and W map to -1 and 1.
        return torch.stack((ux / tex_w * 2.0 - 1.0, uy / tex_h * 2.0 - 1.0), dim=-1)[None]

    # ---- scenes ----------------------------------------------------------------------------
    def sample_layers(self, rng: np.random.Generator, size: int) -> List["Layer"]:
        """A random background and 0..``max_layers`` foreground layers for a ``size``-pixel view."""
        # Background: a texture larger than the view by the largest background travel, so the
        # view never leaves it.
        bvx, bvy = self._speed(rng, self.max_motion / 2.0)
        margin = int(math.ceil(abs(bvx) + abs(bvy))) + 2
        bg_side = size + 2 * margin
        bg = self._texture(rng, bg_side, bg_side)
        layers = [Layer(bg, None, (size / 2.0, size / 2.0), (bvx, bvy),
                        zoom=rng.uniform(-0.05, 0.05))]
        for _ in range(int(rng.integers(0, self.max_layers + 1))):
            ph = int(rng.integers(size // 5, max(size // 5 + 1, int(size * 0.7))))
            pw = int(rng.integers(size // 5, max(size // 5 + 1, int(size * 0.7))))
            tex = self._texture(rng, ph, pw)
            mask = self._mask(rng, ph, pw)
            centre = (rng.uniform(0.0, size), rng.uniform(0.0, size))
            velocity = self._speed(rng, self.max_motion)
            layers.append(Layer(tex, mask, centre, velocity,
                                angle=rng.uniform(-0.3, 0.3),
                                spin=rng.uniform(-0.15, 0.15),  # radians between t = 0 and 1
                                scale=rng.uniform(0.8, 1.2), zoom=rng.uniform(-0.1, 0.1)))
        return layers

    def render(self, rng: np.random.Generator, size: int) -> Triplet:
        """``(x0, y, x1)``: a random scene at t = 0, 0.5 and 1, each ``[3, size, size]`` in [0, 1]."""
        return _render_times(self.sample_layers(rng, size), size)


class Layer:
    """One layer: a ``[3, h, w]`` texture, an optional ``[1, h, w]`` alpha (None = opaque
    background, sampled with reflection so it never runs out), and its linear motion
    (``centre`` and ``velocity`` in output pixels, ``angle``/``spin`` in radians, ``scale``
    and relative ``zoom`` per unit time) -- see the module docstring."""

    def __init__(self, texture: torch.Tensor, mask: Optional[torch.Tensor],
                 centre: Tuple[float, float], velocity: Tuple[float, float], *, angle: float = 0.0,
                 spin: float = 0.0, scale: float = 1.0, zoom: float = 0.0) -> None:
        self.texture, self.mask = texture, mask
        self.centre, self.velocity = centre, velocity
        self.angle, self.spin, self.scale, self.zoom = angle, spin, scale, zoom


def render_layers(layers: Sequence[Layer], size: int, t: float) -> torch.Tensor:
    """The scene at time ``t`` as ``[3, size, size]``, layers composited back to front."""
    dt = t - 0.5
    img = None
    for layer in layers:
        c = (layer.centre[0] + layer.velocity[0] * dt, layer.centre[1] + layer.velocity[1] * dt)
        grid = SceneGenerator._grid(size, layer.texture.shape[1], layer.texture.shape[2], c,
                                    layer.angle + layer.spin * dt, layer.scale * (1.0 + layer.zoom * dt))
        if layer.mask is None:
            img = F.grid_sample(layer.texture[None], grid, mode="bilinear", padding_mode="reflection",
                                align_corners=False)[0]
            continue
        # Premultiplied alpha: no colour bleeds in from outside the mask at its edges.
        rgba = torch.cat((layer.texture * layer.mask, layer.mask))[None]
        sampled = F.grid_sample(rgba, grid, mode="bilinear", padding_mode="zeros",
                                align_corners=False)[0]
        under = img if img is not None else torch.zeros_like(sampled[:3])
        img = sampled[:3] + (1.0 - sampled[3:4]) * under
    return img.clamp_(0.0, 1.0)


def _render_times(layers: Sequence[Layer], size: int) -> Triplet:
    return tuple(render_layers(layers, size, t) for t in TIMES)  # type: ignore[return-value]


def motion_extent(generator: SceneGenerator) -> List[float]:
    """The ``(foreground, background)`` motion limits in pixels, for logs."""
    return [generator.max_motion, generator.max_motion / 2.0]
