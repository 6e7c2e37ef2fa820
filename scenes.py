"""Synthetic dynamic 3D scenes with exact cues: the data this repo trains and tests on offline.

Real video and the networks that give its cues (RAFT, MiDaS) cannot be downloaded where this
repo is built and tested, so the whole pipeline (train.py, every probe) also runs on videos
rendered here, whose depth, flow, instance masks, classes and surface normals are exact.

Parts, top to bottom:
  SyntheticScenes   one seeded video: analytic ray casting (pinhole camera) of a textured
                    ground plane, a sky dome and 5-8 moving objects (class 1 striped spheres
                    rolling, class 2 checkered boxes tumbling, class 3 ringed/dotted
                    cylinders spinning) under a moving camera. Nearest hit wins (z-buffer),
                    so depth, normals, instance masks, classes and flow(t, t2) are exact.
  corrupt_*         cue noise that errs the way real networks do (smooth depth scale/shift
                    errors; blurred flow with outlier patches), --cue-noise in train.py.
  write_synthetic   the DAVIS-2017 layout + Cues/ + Normals/ + Classes/ on disk, which
                    data.VideoFolder, train.py --data and every probe read.

Shapes: T frames, S image side. frames (T, S, S, 3) uint8, depth/masks/classes (T, S, S),
normals (T, S, S, 3) (x right, y down, z forward, camera frame), flow (S, S, 2) pixels.
Cue noise is seeded per frame in write_synthetic (applied to each stored one-step flow) and
per pair in data.PairDataset (to the direct flow).

Commands (data.py has the CLI):  python data.py --make-synthetic /tmp/s [--videos 4 --frames 12]
                                 python data.py --preview /tmp/s
Tests: python -m pytest -q tests/test_data.py
"""
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


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
    """write(tmp_path), fsync, then os.replace: readers (and a power cut) never see a
    half-written file. A failure (a full disk) leaves no .tmp and names `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())     # on disk before the name points at it
        os.replace(tmp, path)
    except BaseException as e:       # also a Ctrl-C: no partial file
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        raise


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
    plus Cues/<v>/<f>.npz (disparity, flow_next, flow_prev as cues.py writes them), Normals/<v>/
    <f>.npz (normals), Classes/<v>/<f>.png (class ids) and, last, synthetic.json (the arguments:
    data.py --make-synthetic recognises a finished set by it). Returns the sequence names."""
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
    manifest = json.dumps(dict(videos=videos, frames=frames, size=size, seed=seed, cue_noise=float(cue_noise)))
    _atomic(root / "synthetic.json", lambda p: Path(p).write_text(manifest))   # last: the set is whole
    return names


# --------------------------------------------------------------------------- pictures of cues
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
