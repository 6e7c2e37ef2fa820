"""Data for LILA: synthetic dynamic 3D scenes with exact cues, video folders, frame pairs.

Paper: Araslanov et al., "Featurising Pixels from Dynamic 3D Scenes with Linear In-Context
Learners", CVPR 2026; DESIGN.md sections 2 ("Frame pairs") and 4 ("Data layouts").

Parts, top to bottom:
  SyntheticScenes   one seeded video: analytic ray casting (pinhole camera) of a textured
                    ground plane, a sky dome and 4-7 moving objects (class 1 striped spheres
                    rolling, class 2 checkered boxes tumbling, class 3 ringed/dotted
                    cylinders spinning) under a moving camera. Nearest hit wins (z-buffer),
                    so depth, normals, instance masks, classes and flow(t, t2) are exact.
  write_synthetic   the DAVIS-2017 layout + Cues/ + Normals/ + Classes/ (DESIGN section 4).
  VideoFolder       YouTube-VOS / DAVIS frame folders; load_cues reads Cues/ npz files.
  PairSampler, warp the paper's pair views (the method part, see the banner).
  PairDataset       torch Dataset of pairs from a VideoFolder (with or without Cues/) or from
                    SyntheticVideos rendered on the fly (PairDataset.synthetic(...), LRU cache).

Shapes: T frames, S image side, H x W image, h x w cue map, Hb = Wb = base side.
  frames (T, S, S, 3) uint8, depth/masks/classes (T, S, S), normals (T, S, S, 3) (x right,
  y down, z forward camera frame), flow (S, S, 2) pixels; grids (S, S, 2) in grid_sample
  convention (x, y in [-1, 1], align_corners=False) mapping view pixels to base positions.

Choices and deviations (documented here once):
  * The pair's shared horizontal flip is folded into both grids: flip_c = shared,
    flip_q = shared xor the query's own flip. Base frames are returned unflipped; a view is
    `warp(base, grid, flip)`. Flow stays in the *base frame's* normalised units (CONTRACT).
  * Bad frames: VideoFolder.load raises ValueError naming the file; PairDataset logs it,
    counts it in `.skipped` and moves on to another pair (at most `retries` times).
    Empty and one-frame videos are skipped (counted, logged) when a VideoFolder is built;
    `verify=True` also opens every frame header there (mixed sizes, unreadable files).
  * Cue noise (corrupt_disparity / corrupt_flow) is seeded per frame in write_synthetic
    (applied to each stored one-step flow) and per pair in PairDataset (to the direct flow).
  * This file is ~770 lines, over STYLE's 500: the renderer could move to its own file.
  * Cue maps whose aspect equals the frame's get the frame's centre crop; other (square)
    maps are taken as already computed on the base frame.

Commands:  python data.py --make-synthetic /tmp/s [--videos 4 --frames 12 --size 224]
           python data.py --preview /tmp/s
"""
import argparse
import logging
import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

log = logging.getLogger("data")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


# --------------------------------------------------------------------------- synthetic scenes
def _rot(axis, angle):
    """Rodrigues: rotation matrices (len(angle), 3, 3) about one unit axis."""
    a = np.asarray(axis, float) / np.linalg.norm(axis)
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    ang = np.atleast_1d(angle)[:, None, None]
    return np.eye(3) + np.sin(ang) * K + (1 - np.cos(ang)) * (K @ K)


def _noise(p, rng, octaves=4, scale=1.0):
    """Cheap smooth 3D 'noise': a sum of random plane waves, ~[-1, 1]. p (N, 3)."""
    dirs = rng.normal(size=(octaves, 3)) * scale * 2.0 ** np.arange(octaves)[:, None] / 2
    return (np.sin(p.astype(np.float32) @ dirs.T.astype(np.float32) + rng.uniform(0, 6.3, octaves).astype(np.float32))
            * (0.6 ** np.arange(octaves)).astype(np.float32)).sum(1) / 1.6


def _hsv(h, s, v):
    """HSV in [0, 1] (arrays of one shape) -> RGB (..., 3) in [0, 1]."""
    h6 = (np.asarray(h) % 1.0) * 6
    c = np.stack([np.clip(np.abs(h6 - 3) - 1, 0, 1), np.clip(2 - np.abs(h6 - 2), 0, 1),
                  np.clip(2 - np.abs(h6 - 4), 0, 1)], -1)  # pure hue
    return np.asarray(v)[..., None] * (1 - np.asarray(s)[..., None] * (1 - c))


def _mix(a, b, w):
    return a + (b - a) * np.clip(w, 0, 1)[:, None]


class SyntheticScenes:
    """One seeded dynamic 3D video with exact depth, flow, masks, classes and normals.

    Args: seed; frames T; size S (square); n_objects (min, max); fov_deg horizontal field
    of view; fog metres of atmospheric falloff; occlusion_tol relative depth tolerance.
    Attributes: .frames .depth .masks .classes .normals (see header); methods .flow(t, t2)
    (S, S, 2) pixels and .occluded(t, t2) (S, S) bool. Class 0 = ground and sky.
    """
    n_classes = 3

    def __init__(self, seed, frames=12, size=224, n_objects=(5, 8), fov_deg=60.0, fog=45.0,
                 sky_radius=100.0, occlusion_tol=0.03):
        rng = np.random.default_rng(seed)
        self.T, self.S, self.tol, self.sky_radius = frames, size, occlusion_tol, sky_radius
        self.f = 0.5 * size / np.tan(np.radians(fov_deg) / 2)  # focal length (pixels)
        t = np.arange(frames, dtype=float)
        # camera: orbit about the scene centre, dolly in/out, bob; looks at a drifting target
        rho = rng.uniform(6.0, 7.5) + rng.uniform(-0.1, 0.1) * t
        th = rng.uniform(0, 2 * np.pi) + rng.choice([-1, 1]) * rng.uniform(0.01, 0.04) * t
        hgt = rng.uniform(1.6, 2.8) + 0.1 * np.sin(0.4 * t + rng.uniform(0, 6))
        self.cam_pos = np.stack([rho * np.sin(th), hgt, rho * np.cos(th)], 1)  # (T, 3)
        target = np.array([0, 0.5, 0]) + rng.uniform(-0.5, 0.5, 3) + rng.normal(0, 0.02, 3) * t[:, None]
        fwd = target - self.cam_pos
        fwd /= np.linalg.norm(fwd, axis=1, keepdims=True)
        right = np.cross(fwd, [0, 1, 0])
        right /= np.linalg.norm(right, axis=1, keepdims=True)
        self.cam_rot = np.stack([right, np.cross(fwd, right), fwd], 2)  # (T, 3, 3) cam->world
        self.light = np.array([rng.uniform(-0.6, 0.6), 1.0, rng.uniform(-0.6, 0.6)])
        self.light /= np.linalg.norm(self.light)
        self.objects = [self._make_object(k, rng, t) for k in range(rng.integers(n_objects[0], n_objects[1] + 1))]
        self.ground_rng_seed, self.sky_rng_seed = rng.integers(1 << 30, size=2)
        hue, sat, val = rng.uniform(0, 1), rng.uniform(0.08, 0.35), rng.uniform(0.55, 0.75)
        self.tile_cols = _hsv([hue, hue + 0.04], [sat, sat * 0.8], [val, val * 0.72])  # two tones
        out = [self._render(i, fog) for i in range(frames)]
        # World hit points are not stored (12 bytes a pixel): `_points` recomputes them exactly
        # from the depth, which keeps a cached 224^2 video at ~15 MB.
        self.frames, self.depth, self.masks, self.classes, self.normals = (
            np.stack(x) for x in zip(*out))

    def _make_object(self, k, rng, t):
        """Class, shape parameters, pose (pos (T, 3), rot (T, 3, 3)) and colours of object k."""
        cls = k % 3 + 1 if k < 3 else int(rng.integers(1, 4))  # every class appears
        p0 = np.array([rng.uniform(-2.5, 2.5), 0, rng.uniform(-2.5, 2.5)])
        ang = rng.uniform(0, 2 * np.pi)
        vel = rng.uniform(0.04, 0.13) * np.array([np.cos(ang), 0, np.sin(ang)])  # m / frame
        bounce = rng.uniform(0.3, 0.8) * np.abs(np.sin(np.pi * t / rng.uniform(6, 14))) * (rng.random() < 0.5)
        R0 = _rot(rng.normal(size=3), rng.uniform(0, 6.3))[0]
        if cls == 1:  # sphere, rolling without slipping (axis up x velocity, angle |v| t / r)
            shape = dict(r=rng.uniform(0.4, 0.8))
            lift = shape["r"]
            rot = _rot(np.cross([0, 1, 0], vel), np.linalg.norm(vel) * t / shape["r"]) @ R0
        elif cls == 2:  # box, tumbling about a random axis
            shape = dict(e=rng.uniform(0.3, 0.65, 3))
            lift = shape["e"].max() + rng.uniform(0, 0.7)
            rot = _rot(rng.normal(size=3), rng.uniform(0.05, 0.2) * t) @ R0
        else:  # cylinder, spinning about its (slightly tilted) axis
            shape = dict(r=rng.uniform(0.25, 0.5), hh=rng.uniform(0.4, 0.9))
            lift = shape["hh"] + rng.uniform(0, 0.3)
            rot = _rot(rng.normal(size=3) * [0.2, 1, 0.2], 0.3 * rng.random()) @ _rot([0, 1, 0], rng.uniform(0.05, 0.25) * t)
        pos = p0 + vel * t[:, None] + np.array([0, 1, 0]) * (lift + bounce)[:, None]
        hue = rng.uniform(0, 1)  # two-tone palette: contrasting hues, one hue in two shades for boxes
        cols = _hsv([hue, hue if cls == 2 else hue + rng.uniform(0.3, 0.7)], rng.uniform(0.5, 0.9, 2),
                    [0.95, 0.5] if cls == 2 else rng.uniform(0.7, 1.0, 2))
        return dict(cls=cls, shape=shape, pos=pos, rot=rot, cols=cols, seed=int(rng.integers(1 << 30)))

    @staticmethod
    def _hit(cls, shape, o, d):
        """Ray (o + s d, local frame) vs shape: s (N,) (inf = miss) and local normals (N, 3)."""
        inf, eps = np.full(len(d), np.inf), 1e-6
        if cls == 1:  # sphere |x| = r
            a, b, c = (d * d).sum(1), (o * d).sum(1), (o * o).sum(1) - shape["r"] ** 2
            disc = b * b - a * c
            s = np.where(disc > 0, (-b - np.sqrt(np.abs(disc))) / a, inf)
            s = np.where(s > eps, s, inf)
            return s, (o + np.where(s < inf, s, 0)[:, None] * d) / shape["r"]
        if cls == 2:  # box |x_i| <= e_i, slab method
            inv = 1 / np.where(np.abs(d) < eps, eps, d)
            t1, t2 = (-shape["e"] - o) * inv, (shape["e"] - o) * inv
            tn, tf = np.minimum(t1, t2), np.maximum(t1, t2)
            s_in, s_out = tn.max(1), tf.min(1)
            s = np.where((s_out >= s_in) & (s_in > eps), s_in, inf)
            n = np.zeros_like(d)
            ax = tn.argmax(1)
            n[np.arange(len(d)), ax] = -np.sign(d[np.arange(len(d)), ax])
            return s, n
        r, hh = shape["r"], shape["hh"]  # cylinder x^2 + z^2 <= r^2, |y| <= hh
        a = d[:, 0] ** 2 + d[:, 2] ** 2 + eps
        b = o[:, 0] * d[:, 0] + o[:, 2] * d[:, 2]
        disc = b * b - a * (o[:, 0] ** 2 + o[:, 2] ** 2 - r * r)
        s_side = (-b - np.sqrt(np.abs(disc))) / a
        s_side = np.where((disc > 0) & (np.abs(o[:, 1] + s_side * d[:, 1]) <= hh) & (s_side > eps), s_side, inf)
        sy = -np.sign(d[:, 1])
        s_cap = (sy * hh - o[:, 1]) / np.where(np.abs(d[:, 1]) < eps, eps, d[:, 1])
        pc = o + s_cap[:, None] * d
        s_cap = np.where((pc[:, 0] ** 2 + pc[:, 2] ** 2 <= r * r) & (s_cap > eps), s_cap, inf)
        p = o + np.where(s_side < inf, s_side, 0)[:, None] * d
        n = np.where((s_side <= s_cap)[:, None], p * [1, 0, 1] / r, np.stack([0 * sy, sy, 0 * sy], 1))
        return np.minimum(s_side, s_cap), n

    def _texture(self, ob, p):
        """Albedo (N, 3) of object-local points p: the class's texture family, moving with it."""
        rng, (c0, c1), cls = np.random.default_rng(ob["seed"]), ob["cols"], ob["cls"]
        n = _noise(p, rng, scale=3.0)
        if cls == 1:  # stripes along the local y axis, wobbling with noise
            w = np.sin(p[:, 1] * 9 + 0.8 * n) > 0
        elif cls == 2:  # 3D checker with wood-like grain
            w = (np.floor(p * 4.0 + 0.15 * n[:, None]).sum(1) % 2) * (0.75 + 0.25 * np.sin(30 * p[:, 0] + 4 * n))
        else:  # rings plus polka dots on the mantle
            ang = np.arctan2(p[:, 2], p[:, 0]) * 6 / np.pi
            dot = np.hypot(ang - np.round(ang), p[:, 1] * 3 - np.round(p[:, 1] * 3)) < 0.3
            w = dot | (np.abs(np.sin(p[:, 1] * 14)) > 0.93)
        return _mix(c0, c1, w) * (0.85 + 0.15 * n[:, None])

    def _footprint(self, ob, t):
        """Flat pixel indices inside the screen box of the object's bounding sphere, found by
        projecting the 8 corners of its camera-aligned bounding cube (all pixels if too near)."""
        sh, S = ob["shape"], self.S
        rad = np.sqrt(sh.get("r", 0) ** 2 + sh.get("hh", 0) ** 2 + (sh.get("e", np.zeros(3)) ** 2).sum())
        c = (ob["pos"][t] - self.cam_pos[t]) @ self.cam_rot[t]  # centre, camera frame
        corners = c + rad * np.array(np.meshgrid([-1, 1], [-1, 1], [-1, 1])).reshape(3, -1).T
        if corners[:, 2].min() <= 1e-2:
            return np.arange(S * S)
        x, y = self.f * corners[:, 0] / corners[:, 2] + S / 2, self.f * corners[:, 1] / corners[:, 2] + S / 2
        c0, c1 = np.clip([np.floor(x.min()), np.ceil(x.max()) + 1], 0, S).astype(int)
        r0, r1 = np.clip([np.floor(y.min()), np.ceil(y.max()) + 1], 0, S).astype(int)
        return (np.arange(r0, r1)[:, None] * S + np.arange(c0, c1)[None]).ravel()

    def _rays(self, t):
        """(S*S, 3) float32 world directions of the pixel rays of frame t, scaled so that the ray
        parameter is the z-depth (camera-frame z = 1)."""
        S, Rc = self.S, np.asarray(self.cam_rot[t], np.float32)
        yy, xx = np.asarray(np.mgrid[0:S, 0:S] + 0.5, np.float32)  # pixel centres
        dc = np.stack([(xx - S / 2) / self.f, (yy - S / 2) / self.f, np.ones_like(xx)], -1).reshape(-1, 3)
        return dc @ Rc.T

    def _points(self, t):
        """(S*S, 3) world points seen in frame t: camera centre + depth * ray (as in _render)."""
        o = np.asarray(self.cam_pos[t], np.float32)
        return o + self.depth[t].reshape(-1)[:, None] * self._rays(t)

    def _render(self, t, fog):
        """Ray cast frame t: (rgb uint8, z-depth, instance ids, class ids, cam normals)."""
        f32 = lambda a: np.asarray(a, np.float32)  # float32 halves the memory traffic
        S, Rc, o = self.S, f32(self.cam_rot[t]), f32(self.cam_pos[t])
        d = self._rays(t)  # (N, 3) world ray directions; the ray parameter s is the z-depth
        b, c = (o * d).sum(1), (o @ o) - self.sky_radius ** 2  # sky dome |x| = R (camera inside)
        s = (-b + np.sqrt(b * b - (d * d).sum(1) * c)) / (d * d).sum(1)
        ids, nrm = np.full(len(d), -1), -d / np.linalg.norm(d, axis=1, keepdims=True)
        s_g = np.where(d[:, 1] < -1e-6, -o[1] / np.minimum(d[:, 1], -1e-6), np.inf)  # ground y = 0
        ids, s, nrm = np.where(s_g < s, 0, ids), np.minimum(s_g, s), np.where((s_g < s)[:, None], f32([0, 1, 0]), nrm)
        for k, ob in enumerate(self.objects, 1):  # z-buffer: nearest hit wins
            R, p = f32(ob["rot"][t]), f32(ob["pos"][t])
            idx = self._footprint(ob, t)  # only the pixels the object can cover
            ol = np.broadcast_to((o - p) @ R, (len(idx), 3))  # local frame: R^T x
            sk, nk = self._hit(ob["cls"], ob["shape"], ol, d[idx] @ R)
            near = sk < s[idx]
            ids[idx[near]], s[idx[near]], nrm[idx[near]] = k, sk[near], nk[near] @ R.T
        X = o + s[:, None] * d  # (N, 3) world hit points
        light = f32(self.light)
        rgb, lam = np.zeros_like(X), np.clip(nrm @ light, 0, 1)
        sky = ids < 0
        elev = np.clip(d[sky, 1] / np.linalg.norm(d[sky], axis=1), 0, 1)
        cp = X[sky] / np.maximum(X[sky, 1:2], 5.0) * [1, 0, 1]  # clouds on a plane above
        cloud = np.clip(1.5 * _noise(cp * 2, np.random.default_rng(self.sky_rng_seed)) - 0.3, 0, 1) * elev ** 0.5
        rgb[sky] = _mix(_mix(np.array([0.8, 0.85, 0.9]), np.array([0.3, 0.5, 0.85]), elev ** 0.6), np.ones(3), cloud)
        g = ids == 0  # ground: stone tiles with grout and mottling, blob shadows, far fade
        q = X[g][:, [0, 2]]
        tile = (np.floor(q).sum(1) % 2)
        grout = np.minimum(np.abs(q - np.round(q)).min(1) / 0.03, 1)
        mott = _noise(X[g], np.random.default_rng(self.ground_rng_seed), 5, 1.5)
        fade = np.exp(-(s[g] / 18) ** 2)  # fade texture contrast far away (cheap anti-aliasing)
        alb = _mix(self.tile_cols[0], self.tile_cols[1], 0.5 + (tile - 0.5) * fade)
        alb = alb * (1 + 0.3 * mott[:, None]) * (1 - 0.5 * fade * (1 - grout))[:, None]
        shade = 0.35 + 0.65 * lam[g]
        for ob in self.objects:  # soft blob shadow: object centre projected along the light
            p = ob["pos"][t]
            cen = p[[0, 2]] - self.light[[0, 2]] * p[1] / self.light[1]
            rad = ob["shape"].get("r", ob["shape"].get("e", np.ones(3)).max()) * 1.2
            shade = shade * (1 - 0.55 * np.exp(-(np.linalg.norm(q - cen, axis=1) / rad) ** 4))
        rgb[g] = alb * shade[:, None]
        for k, ob in enumerate(self.objects, 1):
            m = ids == k
            if m.any():
                refl = 2 * (nrm[m] @ light)[:, None] * nrm[m] - light  # mirrored light direction
                spec = np.clip(-(refl * d[m]).sum(1) / np.linalg.norm(d[m], axis=1), 0, 1)  # Phong
                rgb[m] = self._texture(ob, (X[m] - ob["pos"][t]) @ ob["rot"][t]) * (0.3 + 0.7 * lam[m])[:, None] + 0.25 * spec[:, None] ** 20
        air = np.exp(-s / fog)[:, None]  # atmospheric perspective toward the horizon colour
        rgb = np.where(sky[:, None], rgb, rgb * air + (1 - air) * f32([0.8, 0.85, 0.9]))
        cls = np.array([0] + [ob["cls"] for ob in self.objects])[np.maximum(ids, 0)]
        n_cam = nrm @ Rc  # world -> camera frame
        n_cam /= np.linalg.norm(n_cam, axis=1, keepdims=True)  # float32 hit points: renormalise
        rs = lambda a, *sh: a.reshape(S, S, *sh)
        return (rs((np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8), 3), rs(s.astype(np.float32)),
                rs(np.maximum(ids, 0).astype(np.int32)), rs(cls.astype(np.uint8)),
                rs(n_cam.astype(np.float32), 3))

    def _project(self, t, t2):
        """Move every surface point seen in frame t to time t2 and project it: (u, v, z) (S*S,)."""
        X, ids = self._points(t).astype(float), self.masks[t].ravel()
        for k, ob in enumerate(self.objects, 1):  # ground and sky (id 0) are static
            m = ids == k
            X[m] = ((X[m] - ob["pos"][t]) @ ob["rot"][t]) @ ob["rot"][t2].T + ob["pos"][t2]
        Xc = (X - self.cam_pos[t2]) @ self.cam_rot[t2]  # (N, 3) camera frame of t2
        z = np.maximum(Xc[:, 2], 1e-3)
        return self.f * Xc[:, 0] / z + self.S / 2, self.f * Xc[:, 1] / z + self.S / 2, Xc[:, 2]

    def flow(self, t, t2):
        """Exact optical flow (S, S, 2) float32 pixels from frame t to t2 (occlusion ignored)."""
        u, v, _ = self._project(t, t2)
        yy, xx = np.mgrid[0:self.S, 0:self.S] + 0.5
        return np.stack([u.reshape(self.S, self.S) - xx, v.reshape(self.S, self.S) - yy], -1).astype(np.float32)

    def occluded(self, t, t2):
        """(S, S) bool: the point seen at a pixel of t leaves the image or is hidden in t2
        (its depth differs by more than `occlusion_tol` from all 4 nearest pixels of t2)."""
        u, v, z = self._project(t, t2)
        out = (u < 0) | (v < 0) | (u >= self.S) | (v >= self.S) | (z <= 0)
        seen = np.zeros(len(u), bool)
        for dx in (0, 1):
            for dy in (0, 1):
                i = np.clip(np.floor(v - 0.5).astype(int) + dy, 0, self.S - 1)
                j = np.clip(np.floor(u - 0.5).astype(int) + dx, 0, self.S - 1)
                seen |= np.abs(self.depth[t2][i, j] - z) <= self.tol * np.abs(z)
        return (out | ~seen).reshape(self.S, self.S)


# --------------------------------------------------------------------------- cue noise
def _smooth_field(h, w, rng, waves=4):
    """A smooth random field (h, w), ~zero mean, unit std: a few long-wavelength plane waves."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    k = rng.normal(0, 1.0, (waves, 2))  # about one period per image
    f = sum(np.sin(k[i, 0] * xx * 2 * np.pi + k[i, 1] * yy * 2 * np.pi + rng.uniform(0, 6.3)) for i in range(waves))
    return (f / np.sqrt(waves / 2)).astype(np.float32)


def corrupt_disparity(disp, level, rng):
    """Depth networks err smoothly: disp (h, w) times exp(0.3 level field) plus a shift of
    0.05 level median(disp) times another field (both low frequency), kept positive."""
    if level <= 0:
        return disp
    h, w = disp.shape
    out = disp * np.exp(0.3 * level * _smooth_field(h, w, rng)) + 0.05 * level * np.median(disp) * _smooth_field(h, w, rng)
    return np.maximum(out, 1e-3 * np.median(disp)).astype(np.float32)


def corrupt_flow(flow, level, rng, block=8):
    """Flow networks blur motion boundaries and fail in patches: flow (h, w, 2) pixels is
    Gaussian-blurred (sigma 2 level px), then blocks of block^2 px with probability
    0.05 level get a random offset (std 0.05 level * side px), plus 0.2 level px noise."""
    if level <= 0:
        return flow
    h, w, _ = flow.shape
    sig = 2.0 * level
    x = torch.arange(-int(3 * sig) - 1, int(3 * sig) + 2, dtype=torch.float32)
    g = torch.exp(-x ** 2 / (2 * sig ** 2))
    g = (g / g.sum())
    f = torch.from_numpy(np.ascontiguousarray(flow.transpose(2, 0, 1)))[:, None]  # (2, 1, h, w)
    r = len(g) // 2
    f = F.conv2d(F.pad(f, (r, r, 0, 0), mode="replicate"), g.view(1, 1, 1, -1))  # separable blur
    f = F.conv2d(F.pad(f, (0, 0, r, r), mode="replicate"), g.view(1, 1, -1, 1))
    f = f[:, 0].numpy().transpose(1, 2, 0)  # (h, w, 2)
    bh, bw = -(-h // block), -(-w // block)
    hit = rng.random((bh, bw)) < 0.05 * level
    off = rng.normal(0, 0.05 * level * max(h, w), (bh, bw, 2)) * hit[..., None]
    off = off.repeat(block, 0).repeat(block, 1)[:h, :w]
    return (f + off + rng.normal(0, 0.2 * level, f.shape)).astype(np.float32)


# --------------------------------------------------------------------------- writing the layout
def _palette():
    """The DAVIS / PASCAL VOC colour map (bit-interleaved label -> RGB), flat list of 768."""
    pal = []
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def _atomic(path, write):
    """write(tmp_path) then os.replace: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_png_ids(path, ids):
    im = Image.fromarray(ids.astype(np.uint8), mode="P")
    im.putpalette(_palette())
    _atomic(path, lambda p: im.save(p, format="PNG"))


def _save_npz(path, **arrays):
    def write(p):
        with open(p, "wb") as fh:
            np.savez_compressed(fh, **arrays)
    _atomic(path, write)


def write_synthetic(root, videos=4, frames=12, size=224, seed=0, cue_noise=0.0):
    """Render `videos` SyntheticScenes (video i: seed + i) into ROOT in the DAVIS-2017 layout
    plus Cues/, Normals/, Classes/ (DESIGN section 4). Returns the sequence names."""
    root, names = Path(root), [f"synth{seed + i:04d}" for i in range(videos)]
    for i, seq in enumerate(names):
        sc = SyntheticScenes(seed + i, frames=frames, size=size)
        for t in range(frames):
            fn = f"{t:05d}"
            rng = np.random.default_rng([seed + i, t])  # cue noise of this frame
            im = Image.fromarray(sc.frames[t])
            _atomic(root / "JPEGImages/480p" / seq / f"{fn}.jpg", lambda p: im.save(p, format="JPEG", quality=95))
            _save_png_ids(root / "Annotations/480p" / seq / f"{fn}.png", sc.masks[t])
            _save_png_ids(root / "Classes" / seq / f"{fn}.png", sc.classes[t])
            _save_npz(root / "Normals" / seq / f"{fn}.npz", normals=sc.normals[t].astype(np.float16))
            cues = dict(disparity=corrupt_disparity(1 / sc.depth[t], cue_noise, rng).astype(np.float16))
            if t + 1 < frames:
                cues["flow_next"] = corrupt_flow(sc.flow(t, t + 1), cue_noise, rng).astype(np.float16)
            if t > 0:
                cues["flow_prev"] = corrupt_flow(sc.flow(t, t - 1), cue_noise, rng).astype(np.float16)
            _save_npz(root / "Cues" / seq / f"{fn}.npz", **cues)
    _atomic(root / "ImageSets/2017/val.txt", lambda p: Path(p).write_text("\n".join(names) + "\n"))
    return names


# --------------------------------------------------------------------------- video folders
LAYOUTS = ("JPEGImages/480p/<video>/ (DAVIS)", "JPEGImages/<video>/ (YouTube-VOS)",
           "train_all_frames/JPEGImages/<video>/", "train/JPEGImages/<video>/")


def natural_key(path):
    """Sort key of a frame path: digit runs compare as numbers, so 2.jpg < 10.jpg
    (zero-padded names sort as before)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", Path(path).name)]


class VideoFolder:
    """Frame folders of real video. The first existing layout in LAYOUTS is used.
    `.videos` sorted names, `.frames(v)` paths in natural order (see natural_key), `.load(path)`
    (H, W, 3) uint8 RGB, `.cues_dir` (ROOT/Cues or None), `.skipped` dict of counted skips."""

    def __init__(self, root, verify=False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"data.py: video root {self.root} does not exist (expected one of: ROOT/" + ", ROOT/".join(LAYOUTS) + ")")
        cands = [self.root / "JPEGImages/480p", self.root / "JPEGImages",
                 self.root / "train_all_frames/JPEGImages", self.root / "train/JPEGImages"]
        self.image_dir = next((c for c in cands if c.is_dir()), None)
        if self.image_dir is None:
            raise FileNotFoundError(f"data.py: no video folders under {self.root}: looked for ROOT/" + ", ROOT/".join(LAYOUTS))
        self.skipped = {"empty": 0, "one_frame": 0, "unreadable_or_mixed_sizes": 0, "duplicate_frame_names": 0}
        self._frames = {}
        for d in sorted(p for p in self.image_dir.iterdir() if p.is_dir()):
            fr = sorted((p for p in d.iterdir() if p.suffix.lower() in IMAGE_EXTS), key=natural_key)
            why = "empty" if not fr else "one_frame" if len(fr) == 1 else None
            stems = [p.stem for p in fr]
            if why is None and len(set(stems)) < len(stems):  # 00000.jpg + 00000.png: one cue file
                dup = sorted(p.name for p in fr if stems.count(p.stem) > 1)[:4]
                log.warning("video %s: frames share a name (%s): their cue files would collide", d, ", ".join(dup))
                why = "duplicate_frame_names"
            if why is None and verify:
                why = self._verify(fr)
            if why:
                self.skipped[why] += 1
                log.warning("skipping video %s (%s)", d, why)
            else:
                self._frames[d.name] = fr
        self.videos = sorted(self._frames)
        if not self.videos:
            raise FileNotFoundError(f"data.py: no videos with >= 2 frames in {self.image_dir} (skipped: {self.skipped}); "
                                    "layouts: ROOT/" + ", ROOT/".join(LAYOUTS))
        if any(self.skipped.values()):
            log.warning("VideoFolder %s: %d videos, skipped %s", self.root, len(self.videos), self.skipped)
        self.cues_dir = self.root / "Cues" if (self.root / "Cues").is_dir() else None

    @staticmethod
    def _verify(frames):
        """Open every header: 'unreadable_or_mixed_sizes' if one fails or sizes differ."""
        try:
            sizes = {Image.open(p).size for p in frames}
        except Exception as e:
            log.warning("unreadable frame header: %s", e)
            return "unreadable_or_mixed_sizes"
        return None if len(sizes) == 1 else "unreadable_or_mixed_sizes"

    def frames(self, video):
        return self._frames[video]

    def check_cues(self):
        """Error unless ROOT/Cues/<video> holds one .npz per frame of every video (a half-written
        cache is completed by rerunning `python cues.py --data ROOT`, which skips finished files)."""
        missing = {}
        for v in self.videos:
            d = self.root / "Cues" / v
            have = {n[:-4] for n in os.listdir(d) if n.endswith(".npz")} if d.is_dir() else set()
            lack = [p.stem for p in self._frames[v] if p.stem not in have]
            if lack:
                missing[v] = lack
        if missing:
            v, lack = next(iter(missing.items()))
            raise FileNotFoundError(
                f"data.py: the cue cache {self.root / 'Cues'} is incomplete: {len(missing)} of {len(self.videos)} "
                f"videos lack cue files (e.g. {d.parent / v}/{lack[0]}.npz); complete it with "
                f"`python cues.py --data {self.root}`, or train with --cues hub")

    @staticmethod
    def load(path):
        """(H, W, 3) uint8 RGB from any PIL mode (L, LA, RGBA, CMYK, P, I;16 ...)."""
        try:
            with Image.open(path) as im:
                im.load()  # decodes fully: truncated files fail here
                if im.mode in ("I", "I;16", "F"):  # 16-bit / float grey: scale to 8 bit
                    a = np.asarray(im, np.float32)
                    im = Image.fromarray((255 * a / max(a.max(), 1)).astype(np.uint8))
                return np.asarray(im.convert("RGB"))
        except Exception as e:
            raise ValueError(f"data.py: cannot read image {path}: {type(e).__name__}: {e}") from None


def _check_cue(path, key, a, shape):
    """data.py: a cue array must have the documented shape and plausible, finite values."""
    want = "(h, w)" if key == "disparity" else "(h, w, 2)"
    if a.ndim != (2 if key == "disparity" else 3) or (key != "disparity" and a.shape[-1] != 2) \
            or (shape is not None and a.shape != shape):
        raise ValueError(f"data.py: cue file {path}: '{key}' has shape {a.shape}, expected {want}"
                         + (f" = {shape}" if shape is not None else ""))
    if not np.isfinite(a).all():
        raise ValueError(f"data.py: cue file {path}: '{key}' holds {int((~np.isfinite(a)).sum())} NaN/inf values")
    if key == "disparity" and not (a > 0).mean() >= 0.25:  # sky may be <= 0, not most of a frame
        raise ValueError(f"data.py: cue file {path}: 'disparity' is positive on only {100 * (a > 0).mean():.0f} % of "
                         "the pixels (expected relative inverse depth: larger = nearer, > 0)")
    if key != "disparity" and np.abs(a).max() > 2 * max(a.shape[:2]):
        raise ValueError(f"data.py: cue file {path}: '{key}' reaches {np.abs(a).max():.3g} px, more than twice "
                         f"the map size {a.shape[:2]} (flow is stored in pixels of the map)")


def load_cues(root, video, i, j, names=None):
    """Cues of frames i and j from ROOT/Cues/<video>/<name>.npz. `names` are the frame stems
    (default: the npz files in natural order). Flow i->j chains flow_next (flow_prev if j < i):
    f_{i->k+1}(x) = f_{i->k}(x) + f_{k->k+1}(x + f_{i->k}(x)) (bilinear). Returns float32
    torch dict(flow_fwd (2, h, w), flow_bwd (2, h, w) normalised, disparity_i/j (1, h, w)).
    A missing, unreadable or implausible file is an error naming it (_check_cue)."""
    d = Path(root) / "Cues" / video
    names = names or [p.stem for p in sorted(d.glob("*.npz"), key=natural_key)]
    cache = {}

    def get(k, key, shape=None):
        path = d / f"{names[k]}.npz"
        if k not in cache:
            if not path.is_file():
                raise FileNotFoundError(f"data.py: missing cue file {path}")
            try:
                with np.load(path, allow_pickle=False) as z:
                    cache[k] = {name: z[name] for name in z.files}
            except Exception as e:
                raise ValueError(f"data.py: cannot read cue file {path} ({type(e).__name__}: {e})") from None
        if key not in cache[k]:
            raise ValueError(f"data.py: cue file {path} has no '{key}' (has {sorted(cache[k])})")
        a = np.asarray(cache[k][key], np.float32)
        _check_cue(path, key, a, shape)
        return torch.from_numpy(a)

    if not 0 <= min(i, j) <= max(i, j) < len(names):
        raise ValueError(f"data.py: frames {i}, {j} out of range for {len(names)} cue files in {d}")
    disp_i = get(i, "disparity")  # (h, w), fixes the map size
    ref_shape = tuple(disp_i.shape)
    h, w = ref_shape
    scale = torch.tensor([2 / w, 2 / h]).view(2, 1, 1)

    def chain(a, b):
        flow = torch.zeros(2, h, w)  # pixels
        step = 1 if b > a else -1
        for k in range(a, b, step):
            f = get(k, "flow_next" if step > 0 else "flow_prev", ref_shape + (2,)).permute(2, 0, 1)  # (2, h, w)
            flow = flow + _sample(f, flow * scale) if k != a else f
        return flow * scale

    return dict(flow_fwd=chain(i, j), flow_bwd=chain(j, i),
                disparity_i=disp_i[None], disparity_j=get(j, "disparity", ref_shape)[None])


def _sample(x, flow):
    """x (C, h, w) read at pixel + flow (2, h, w, normalised units), bilinear, border."""
    _, h, w = x.shape
    ys, xs = torch.meshgrid((torch.arange(h) + 0.5) * 2 / h - 1, (torch.arange(w) + 0.5) * 2 / w - 1, indexing="ij")
    grid = torch.stack([xs + flow[0], ys + flow[1]], -1)[None]  # (1, h, w, 2)
    return F.grid_sample(x[None], grid, mode="bilinear", padding_mode="border", align_corners=False)[0]


# --------------------------------------------------------------------------- method: frame pairs
HI_RES = 480  # side of the square base frame the views are cut from (official dataload.py: Resize(480), CenterCrop(480))


class PairSampler:
    """The views of one frame pair (official dataload.py YTVOS + configs/train_ytvos.yaml):
    delta ~ U{1..gap} (gap 5); one shared horizontal flip of both frames (p = 0.5, applied by the
    dataset to the frames and their cue maps); the query view is a random square crop of
    query_area (a fraction of the area, uniform in [0.3, 1]) at a random position with its own
    flip (p = 0.5); the context view a square crop of ctx_area = 0.8 at a random position, never
    flipped on its own. Crops are integer pixel boxes (top, left, side) of the hi x hi base
    frame, as torchvision's RandomResizedCrop.get_params (ratio 1) draws them.
    sample(generator) -> dict(box_q, box_c, grid_q, grid_c (size, size, 2), flip, flip_q, delta).
    crop=False (ablation): both views are the whole base frame (flips kept)."""

    def __init__(self, size=224, hi=HI_RES, gap=5, crop=True, query_area=(0.3, 1.0), ctx_area=0.8):
        self.size, self.hi, self.gap, self.crop = size, hi, gap, crop
        self.query_area, self.ctx_area = query_area, ctx_area

    def _box(self, area, g):
        side = min(self.hi, max(1, round(np.sqrt(area) * self.hi))) if self.crop else self.hi
        top, left = (int(torch.randint(0, self.hi - side + 1, (1,), generator=g)) for _ in range(2))
        return top, left, side

    def sample(self, g):
        shared, own = (torch.rand(2, generator=g) < 0.5).tolist()
        delta = int(torch.randint(1, self.gap + 1, (1,), generator=g))
        lo, hi = self.query_area
        box_q = self._box(lo + (hi - lo) * float(torch.rand(1, generator=g)), g)
        box_c = self._box(self.ctx_area, g)
        return dict(box_q=box_q, box_c=box_c, grid_q=crop_grid(box_q, self.hi, self.size, own),
                    grid_c=crop_grid(box_c, self.hi, self.size, False), flip=shared, flip_q=own, delta=delta)


def crop_grid(box, hi, size, flip=False):
    """The grid_sample grid (size, size, 2) (x, y in [-1, 1], align_corners=False) that maps each
    pixel of a view to its position in the base frame: the view shows the box (top, left, side)
    of an hi x hi frame, mirrored if `flip`. The grid is in the base frame's normalised units,
    so it reads any cue map of the same frame, whatever its resolution."""
    top, left, side = box
    u = (torch.arange(size, dtype=torch.float64) + 0.5) / size        # view pixel centres in (0, 1)
    xs = 2 * (left + side * (u.flip(0) if flip else u)) / hi - 1      # a flipped view reads the box mirrored
    ys = 2 * (top + side * u) / hi - 1
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij")[::-1], -1).float()  # (size, size, 2) x, y


def cut_view(frame, box, size, flip=False):
    """frame (C, hi, hi) -> the view (C, size, size): the box cut out and resized with
    antialiasing (official: torchvision resized_crop(..., antialias=True)), mirrored if `flip`.
    Sharp even for small crops: the box is cut from the high-resolution frame, not from the
    cue-resolution one."""
    top, left, side = box
    x = frame[None, :, top:top + side, left:left + side]                # (1, C, side, side)
    x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False,
                      antialias=side > size)[0]                         # (C, size, size)
    return x.flip(-1) if flip else x


def warp(x, grid):
    """x (B, C, Hb, Wb), a map on the base frame -> (B, C, S, S) in the view (bilinear,
    align_corners=False, border). Values are copied, never changed: flow keeps the base
    frame's normalised units whatever the crop's zoom or the view's own flip, so that one
    linear map reads the query and the context alike (the official code does the same)."""
    grid = grid if grid.dim() == 4 else grid[None].expand(len(x), -1, -1, -1)  # (B, S, S, 2)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def hflip_cues(cues):
    """The cue maps of a mirrored frame pair: every map mirrored, and flow-x negated, because
    in the mirrored video things move the other way (the shared flip, as if the cue networks had
    seen the flipped frames). cues: dict of (..., C, H, W) tensors with keys flow_* and others."""
    out = {}
    for k, v in cues.items():
        v = v.flip(-1)
        if k.startswith("flow"):
            v = torch.cat([-v[..., :1, :, :], v[..., 1:, :, :]], -3)
        out[k] = v
    return out


# --------------------------------------------------------------------------- datasets
class SyntheticVideos:
    """`n` SyntheticScenes (video i: seed + i) rendered at `size` on demand, an LRU of `cache`
    videos (each DataLoader worker holds its own; ~15 MB per 12-frame 224^2 video, ~0.4 s of
    CPU to render one. With shuffling, cache >= n avoids re-rendering)."""

    def __init__(self, n=8, frames=12, size=224, seed=0, cache=8):
        self.n, self.T, self.size, self.seed, self.cache = n, frames, size, seed, cache
        self._lru = OrderedDict()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i not in self._lru:
            self._lru[i] = SyntheticScenes(self.seed + i, frames=self.T, size=self.size)
            while len(self._lru) > self.cache:
                self._lru.popitem(last=False)
        self._lru.move_to_end(i)
        return self._lru[i]


def _square(img, side):
    """(H, W, 3) uint8 -> PIL image side x side: the centre square of the frame, resized (PIL
    bicubic, antialiased). Cut first, so a huge or extreme-aspect frame costs nothing."""
    im = Image.fromarray(np.asarray(img, dtype=np.uint8))
    w, h = im.size
    c = min(w, h)
    l, t = (w - c) // 2, (h - c) // 2
    im = im.crop((l, t, l + c, t + c))
    return im if c == side else im.resize((side, side), Image.BICUBIC)


def _to_tensor(im):
    return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).float() / 255  # (3, H, W)


def base_frames(img, base, hi=HI_RES):
    """(H, W, 3) uint8 -> (hi-res (3, hi, hi), cue-res (3, base, base)) float in [0, 1]: the
    base frame of the pair (the frame's centre square at 480 x 480, official dataload.py), and
    that frame resized to the cue resolution (PIL bicubic). Views are cut from the first; cues
    are computed on the second (cues.py writes its cache on exactly these frames)."""
    sq = _square(img, hi)
    return _to_tensor(sq), _to_tensor(sq if base == hi else sq.resize((base, base), Image.BICUBIC))


def base_frame(img, base, hi=HI_RES):
    """The cue-resolution base frame (3, base, base) of `base_frames`."""
    return base_frames(img, base, hi)[1]


def _cue_to_base(x, frame_hw, base, is_flow=False):
    """Cue map (C, h, w) -> (C, base, base): the frame's centre crop if the map has the frame's
    aspect (normalised flow rescaled to the crop), else the map is taken as base-aligned."""
    _, h, w = x.shape
    H, W = frame_hw
    if abs(h / w - H / W) < 1e-2 and h != w:
        c = min(h, w)
        x = x[:, (h - c) // 2:(h - c) // 2 + c, (w - c) // 2:(w - c) // 2 + c]
        if is_flow:
            x = x * torch.tensor([w / c, h / c]).view(2, 1, 1)
    return F.interpolate(x[None], size=(base, base), mode="bilinear", align_corners=False)[0]


def _downsample(x, size):
    """(C, R, R) -> (C, size, size): the mean over each k x k block when R = k size (the exact
    cue of a low-resolution pixel is the mean over the render pixels it covers), else an
    antialiased bilinear resize."""
    R = x.shape[-1]
    if R % size == 0:
        return F.avg_pool2d(x[None], R // size)[0] if R > size else x
    return F.interpolate(x[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


class PairDataset(torch.utils.data.Dataset):
    """Frame pairs with their two views (official dataload.py YTVOS, see PairSampler).

    Item i: video i % len(self) (every video equally often, however long it is), then frame t
    uniform in 0..T-2 and t2 = min(t + delta, T - 1); everything seeded by (seed, i). i may
    exceed len(self): train.py numbers samples across epochs, so each epoch draws fresh frames,
    crops and flips. Returns float tensors:
      views (2, 3, S, S)     the query view (of frame t) and the context view (of frame t2),
                             cut from the hi-res base frames (sharp) and resized to S
      frames (2, 3, Hb, Wb)  both base frames at the cue resolution (Hb = Wb = base)
      grid_q, grid_c (S, S, 2), flip, flip_q, delta (see PairSampler; the shared flip is
                             already applied to frames, views and cues)
      flow_fwd, flow_bwd (2, Hb, Wb) normalised, disparity (2, 1, Hb, Wb)   (if with_cues)
    Sources: a VideoFolder (cues from ROOT/Cues if with_cues, else none: the trainer computes
    them), or SyntheticVideos (exact cues, rendered at their own size, which acts as the hi-res
    base; cue_noise as in write_synthetic). A pair that fails to load is logged, counted in
    .skipped and replaced by another one (at most `retries` times)."""

    def __init__(self, source, size=224, base=224, gap=5, crop=True, seed=0, cue_noise=0.0, with_cues=True, retries=10):
        self.source, self.size, self.base, self.seed = source, size, base, seed
        self.cue_noise, self.retries, self.with_cues = cue_noise, retries, with_cues
        self.synthetic = isinstance(source, SyntheticVideos)
        self.hi = source.size if self.synthetic else HI_RES
        if self.synthetic and source.size < base:
            raise ValueError(f"data.py: synthetic videos are rendered at {source.size}, below the cue resolution {base}")
        self.sampler = PairSampler(size=size, hi=self.hi, gap=gap, crop=crop)
        self.lengths = [source.T] * len(source) if self.synthetic else [len(source.frames(v)) for v in source.videos]
        if not self.synthetic and with_cues and source.cues_dir is not None:
            source.check_cues()
        self.skipped = 0

    @classmethod
    def synthetic(cls, videos=8, frames=12, scene_seed=0, base=224, size=224, render=None, cache=8, **kw):
        """Pairs from `videos` synthetic videos rendered on the fly (video i: scene_seed + i,
        as in write_synthetic) at `render` px (default 2 * size: the smallest query crop, 30 % of
        the area, then still has more render pixels than view pixels, so no view is ever
        upsampled, as with the 480 px base of real video). The pair seed `seed` (in kw)
        defaults to scene_seed."""
        kw.setdefault("seed", scene_seed)
        render = render or 2 * size
        return cls(SyntheticVideos(videos, frames, render, scene_seed, cache), base=base, size=size, **kw)

    def __len__(self):
        return len(self.lengths)

    def __getitem__(self, i):
        last = None
        for k in range(self.retries + 1):
            key = i + 7919 * k              # deterministic replacement pair
            try:
                return self._item(key)
            except (ValueError, FileNotFoundError) as e:
                self.skipped += 1
                last = e
                log.warning("skipping pair %d (%d skipped so far): %s", key, self.skipped, e)
        raise RuntimeError(f"data.py: {self.retries + 1} pairs in a row failed to load from "
                           f"{getattr(self.source, 'root', 'the synthetic videos')}; the last: {last}")

    def _item(self, key):
        v = key % len(self.lengths)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + key)
        s = self.sampler.sample(g)
        T = self.lengths[v]
        t = int(torch.randint(0, T - 1, (1,), generator=g))
        t2 = min(t + s["delta"], T - 1)
        hi, cues = self._frames_and_cues(v, t, t2, key)                 # (2, 3, hi, hi), dict
        if s["flip"]:                                                   # the shared flip
            hi, cues = hi.flip(-1), hflip_cues(cues)
        views = torch.stack([cut_view(hi[0], s["box_q"], self.size, s["flip_q"]),
                             cut_view(hi[1], s["box_c"], self.size)])   # (2, 3, S, S)
        return dict(views=views, grid_q=s["grid_q"], grid_c=s["grid_c"], flip=torch.tensor(s["flip"]),
                    flip_q=torch.tensor(s["flip_q"]), delta=torch.tensor(t2 - t), **cues)

    def _frames_and_cues(self, v, t, t2, key):
        """The two hi-res base frames (2, 3, hi, hi) and a dict with the cue-resolution frames
        (2, 3, base, base) and, if with_cues, the cue maps of the pair (unflipped)."""
        if self.synthetic:
            sc = self.source[v]
            hi = torch.from_numpy(sc.frames[[t, t2]]).permute(0, 3, 1, 2).float() / 255  # (2, 3, R, R)
            out = dict(frames=torch.stack([_downsample(x, self.base) for x in hi]))
            if self.with_cues:
                out.update(self._synthetic_cues(sc, t, t2, key))
            return hi, out
        name, src = self.source.videos[v], self.source
        paths = [src.frames(name)[t], src.frames(name)[t2]]
        imgs = [src.load(p) for p in paths]
        if imgs[0].shape != imgs[1].shape:
            raise ValueError(f"data.py: mixed frame sizes in video {name}: {paths[0]} {imgs[0].shape[:2]} vs {paths[1]} {imgs[1].shape[:2]}")
        pairs = [base_frames(im, self.base, self.hi) for im in imgs]
        out = dict(frames=torch.stack([p[1] for p in pairs]))          # (2, 3, Hb, Wb)
        if src.cues_dir is not None and self.with_cues:
            c = load_cues(src.root, name, t, t2, names=[p.stem for p in src.frames(name)])
            hw = imgs[0].shape[:2]
            out["flow_fwd"] = _cue_to_base(c["flow_fwd"], hw, self.base, True)
            out["flow_bwd"] = _cue_to_base(c["flow_bwd"], hw, self.base, True)
            out["disparity"] = torch.stack([_cue_to_base(c["disparity_i"], hw, self.base),
                                            _cue_to_base(c["disparity_j"], hw, self.base)])
        return torch.stack([p[0] for p in pairs]), out

    def _synthetic_cues(self, sc, t, t2, key):
        """Exact flow (both ways) and disparity at the render size, downsampled to the cue
        resolution, then corrupted there (cue_noise, seeded by (seed, key)) like write_synthetic."""
        rng = np.random.default_rng([self.seed, key])
        b, R = self.base, sc.S
        fl = []
        for a, c in ((t, t2), (t2, t)):
            f = _downsample(torch.from_numpy(sc.flow(a, c)).permute(2, 0, 1), b) * (b / R)  # (2, b, b) px
            f = corrupt_flow(f.permute(1, 2, 0).numpy(), self.cue_noise, rng)
            fl.append(torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1) * (2 / b))  # normalised
        dp = [torch.from_numpy(corrupt_disparity(_downsample(torch.from_numpy(1 / sc.depth[a])[None], b)[0].numpy(),
                                                 self.cue_noise, rng))[None] for a in (t, t2)]
        return dict(flow_fwd=fl[0], flow_bwd=fl[1], disparity=torch.stack(dp))  # (2,b,b) x2, (2,1,b,b)


# --------------------------------------------------------------------------- preview + CLI
def flow_to_rgb(flow, max_mag=None):
    """Flow (h, w, 2) pixels -> (h, w, 3) uint8 on the colour wheel: hue = direction,
    saturation = magnitude / max_mag (default: 99th percentile), white = still."""
    mag = np.hypot(flow[..., 0], flow[..., 1])
    max_mag = max_mag or max(np.percentile(mag, 99), 1e-6)
    hue = (np.arctan2(-flow[..., 1], -flow[..., 0]) / np.pi + 1) / 2
    return (255 * _hsv(hue, np.clip(mag / max_mag, 0, 1), np.ones_like(mag))).astype(np.uint8)


def _depth_rgb(depth):
    """Depth -> (h, w, 3) uint8: disparity / its 99th percentile on a magma-like ramp (near = bright)."""
    x = 1 / depth
    x = np.clip(x / max(np.percentile(x, 99), 1e-9), 0, 1) ** 0.7
    stops = np.array([[0, 0, 4], [80, 18, 123], [183, 55, 121], [252, 137, 97], [252, 253, 191]], float)
    i = np.clip(x * 4, 0, 3.999)
    k = i.astype(int)
    return (stops[k] + (stops[k + 1] - stops[k]) * (i - k)[..., None]).astype(np.uint8)


def preview(root, rows=4, video=None):
    """One PNG grid from a written synthetic (or any DAVIS + Cues) root: rows = frames,
    columns = RGB, depth, flow to the next frame, instances, classes, normals."""
    root = Path(root)
    vf = VideoFolder(root)
    vids = [video] if video else vf.videos  # rows cycle over the videos, frames spread in time
    ts = np.linspace(0, min(len(vf.frames(v)) for v in vids) - 2, rows).round().astype(int)
    pal = np.array(_palette(), np.uint8).reshape(256, 3)
    cols = ["RGB", "depth", "flow t->t+1", "instances", "classes", "normals"]
    tiles = []
    for r, t in enumerate(ts):
        video = vids[r % len(vids)]
        stem = vf.frames(video)[t].stem
        img = vf.load(vf.frames(video)[t])
        h, w = img.shape[:2]
        blank = np.full_like(img, 128)
        row = [img]
        cue = root / "Cues" / video / f"{stem}.npz"
        if cue.is_file():
            c = np.load(cue)
            row += [_depth_rgb(1 / np.maximum(c["disparity"].astype(np.float32), 1e-6)),
                    flow_to_rgb(c["flow_next"].astype(np.float32)) if "flow_next" in c else blank]
        else:
            row += [blank, blank]
        for sub in ("Annotations/480p", "Classes"):
            p = root / sub / video / f"{stem}.png"
            row.append(pal[np.asarray(Image.open(p))] if p.is_file() else blank)
        p = root / "Normals" / video / f"{stem}.npz"
        row.append(((np.load(p)["normals"].astype(np.float32) * [1, -1, -1] + 1) * 127.5).astype(np.uint8) if p.is_file() else blank)
        tiles.append(row)
    gap, title = 4, 18
    canvas = np.full((title + rows * (h + gap), len(cols) * (w + gap), 3), 255, np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            canvas[title + r * (h + gap):title + r * (h + gap) + h, c * (w + gap):c * (w + gap) + w] = tile
    im = Image.fromarray(canvas)
    draw = ImageDraw.Draw(im)
    for c, name in enumerate(cols):
        draw.text((c * (w + gap) + 4, 3), name, fill=(0, 0, 0))
    out = root / "preview.png"
    _atomic(out, lambda p: im.save(p, format="PNG"))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description="LILA data: write / preview synthetic dynamic 3D scenes")
    act = ap.add_mutually_exclusive_group(required=True)
    act.add_argument("--make-synthetic", metavar="DIR", help="write the DAVIS layout + Cues/ Normals/ Classes/ to DIR")
    act.add_argument("--preview", metavar="DIR", help="write DIR/preview.png (frames, depth, flow, masks, classes, normals)")
    g = ap.add_argument_group("synthetic scenes")
    g.add_argument("--videos", type=int, default=4, help="number of videos (default 4)")
    g.add_argument("--frames", type=int, default=12, help="frames per video (default 12)")
    g.add_argument("--size", type=int, default=224, help="square frame side in pixels (default 224 = the paper's base)")
    g.add_argument("--seed", type=int, default=0, help="video i uses seed + i (default 0)")
    g.add_argument("--cue-noise", type=float, default=0.0, help="cue corruption level, 0 = exact cues (default 0; 1 = strong)")
    a = ap.parse_args(argv)
    if min(a.videos, a.frames - 1, a.size - 15) < 1 or a.cue_noise < 0:
        ap.error("need --videos >= 1, --frames >= 2, --size >= 16, --cue-noise >= 0")
    if a.make_synthetic:
        print(vars(a))
        names = write_synthetic(a.make_synthetic, a.videos, a.frames, a.size, a.seed, a.cue_noise)
        print(f"wrote {len(names)} videos to {a.make_synthetic}")
    else:
        print(preview(a.preview))


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    main()
