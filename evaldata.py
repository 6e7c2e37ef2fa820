"""evaldata.py: the evaluation datasets of probe.py as released, their label spaces, and the
probes' augmentations.

LILA (Araslanov et al., CVPR 2026) reports its pixel features on DAVIS-2017 (VOS), NYUv2
(surface normals), COCO-Stuff-27 and ADE20K (semantic segmentation) and COCO-Stuff with 15
unseen classes (zero-shot). This file reads each benchmark in the layout its authors release
and turns an item into the crops the official evaluation trains and scores on (official
lila/dataload.py: SegDataset, ZShotSegDataset, NormalsDataset, VideoDataset). Every benchmark
also has a stand-in in the synthetic layout of data.write_synthetic, which the tests use.

Layouts (ROOT = --data):
  DAVIS-2017   ROOT/JPEGImages/480p/<seq>/*.jpg, ROOT/Annotations/480p/<seq>/*.png (indexed
               PNG, 0 = background, 1..N objects), ROOT/ImageSets/2017/val.txt
  DAVIS-2016   the same folders with 0/255 grayscale masks (one object per sequence) and
               ROOT/ImageSets/480p/val.txt (frame paths) or ImageSets/2016/val.txt (names)
  NYUv2        Probe3D's ROOT/nyuv2_snorm_all.pkl (images, depths, snorms, train_indices,
               test_indices; mbanani/probe3d data_processing/create_nyu_pkl.py), or the
               official ROOT/nyu_{train,val}_{image,depth,normal}.pkl lists
  COCO-Stuff   ROOT/{train2017,val2017}/<id>.jpg with the stuffthingmaps PNG (fine ids 0..181,
               255 unlabelled) beside it (all three zips unzipped into ROOT, as the official
               prep_data.sh), in ROOT/stuffthingmaps_trainval2017/<split>/ or in
               ROOT/annotations/<split>/; images may also sit in ROOT/images/<split>/
  ADE20K       ROOT/images/{training,validation}/*.jpg, ROOT/annotations/{...}/*.png (0 =
               "other" -> ignored, 1..150 -> 0..149: reduce-zero-label)
  synthetic    ROOT/JPEGImages/480p/<video>/*.jpg + ROOT/Normals/<video>/*.npz (normals) or
               ROOT/Classes/<video>/*.png (classes); held-out videos: ImageSets/2017/train.txt
               vs val.txt, else the last --val-videos

Shapes: H x W image, S crop side, C classes. An item is (image (H, W, 3) uint8, target) with
target {"labels": (H, W) int64, 255 = ignore} or {"normals": (H, W, 3) float32, "valid":
(H, W) bool}. A view (Views) is image (3, S, S) float in [0, 1] plus the target as tensors.

Deviations from the official readers: the COCO-Stuff file lists default to STEGO's curated
lists when ROOT/curated/<split>/Coco164kFull_Stuff_Coarse.txt exists (the official
splits/*_Coco164kFull_Stuff_Coarse.txt are not public), else every image; ids the 182-class
map does not know go to 255 (official: -1). The official code has no ADE20K reader.
Use: import evaldata; ds = evaldata.open_dense(ROOT, "semseg", "train", val_videos=1)
"""
import os
import pickle
import re
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

VOID = 255  # ignore label of every benchmark here


class BenchmarkError(ValueError):
    """A dataset that is not where, or not what, the user said: one line, the file named."""

    def __init__(self, msg):
        super().__init__(f"evaldata.py: {msg}")


def natural_key(name):
    """Sort key that orders '2.jpg' before '10.jpg' (numbers compared as numbers)."""
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.split(r"(\d+)", str(name)) if t]


# --- label spaces ---

# COCO-Stuff fine id (0..181 = COCO-Stuff label id - 1) -> the 27 coarse classes of
# COCO-Stuff-27 (PiCIE / STEGO; the official lila/dataload.py SegDataset.fine_to_coarse).
COCO_FINE_TO_COARSE = (
    [9] + [11] * 8 + [8] * 6 + [7] * 10 + [6] * 8 + [10] * 10 + [5] * 8 + [2] * 10 + [3] * 10
    + [0] * 6 + [1] * 6 + [4] * 8                                     # things, fine 0..90
    + [17, 17, 22, 20, 20, 22, 15, 25, 16, 13, 12, 12, 17, 17, 23, 15, 15, 17, 15, 21,   # 91..
       15, 25, 13, 13, 13, 13, 13, 22, 26, 14, 14, 15, 22, 21, 21, 24, 20, 22, 15, 17,   # 111..
       16, 15, 22, 24, 21, 17, 25, 16, 21, 17, 22, 16, 21, 21, 25, 21, 26, 21, 24, 20,   # 131..
       17, 14, 21, 26, 15, 23, 20, 21, 24, 15, 24, 22, 25, 15, 20, 17, 17, 22, 14, 18,   # 151..
       18, 18, 18, 18, 18, 18, 26, 26, 19, 19, 24])                  # stuff 171..181
assert len(COCO_FINE_TO_COARSE) == 182

# The 182 COCO-Stuff class names in fine-id order (nightrome/cocostuff labels.md, id - 1),
# used to build CLIP text embeddings for the zero-shot probe.
COCO_NAMES = (
    "person bicycle car motorcycle airplane bus train truck boat traffic_light fire_hydrant "
    "street_sign stop_sign parking_meter bench bird cat dog horse sheep cow elephant bear zebra "
    "giraffe hat backpack umbrella shoe eye_glasses handbag tie suitcase frisbee skis snowboard "
    "sports_ball kite baseball_bat baseball_glove skateboard surfboard tennis_racket bottle plate "
    "wine_glass cup fork knife spoon bowl banana apple sandwich orange broccoli carrot hot_dog "
    "pizza donut cake chair couch potted_plant bed mirror dining_table window desk toilet door tv "
    "laptop mouse remote keyboard cell_phone microwave oven toaster sink refrigerator blender book "
    "clock vase scissors teddy_bear hair_drier toothbrush hair_brush banner blanket branch bridge "
    "building-other bush cabinet cage cardboard carpet ceiling-other ceiling-tile cloth clothes "
    "clouds counter cupboard curtain desk-stuff dirt door-stuff fence floor-marble floor-other "
    "floor-stone floor-tile floor-wood flower fog food-other fruit furniture-other grass gravel "
    "ground-other hill house leaves light mat metal mirror-stuff moss mountain mud napkin net "
    "paper pavement pillow plant-other plastic platform playingfield railing railroad river road "
    "rock roof rug salad sand sea shelf sky-other skyscraper snow solid-other stairs stone straw "
    "structural-other table tent textile-other towel tree vegetable wall-brick wall-concrete "
    "wall-other wall-panel wall-stone wall-tile wall-wood water-other waterdrops window-blind "
    "window-other wood").split()
COCO_NAMES = [n.replace("_", " ") for n in COCO_NAMES]
assert len(COCO_NAMES) == 182

# The 15 unseen classes of zero-shot COCO-Stuff (SPNet / ZS3Net split; the official code loads
# them from splits/novel_cls.npy): cow, giraffe, suitcase, frisbee, skateboard, carrot,
# scissors, cardboard, clouds, grass, playingfield, river, road, tree, wall-concrete.
COCO_UNSEEN = (20, 24, 32, 33, 40, 56, 86, 99, 105, 123, 144, 147, 148, 168, 171)

# Prompt templates of the text embeddings: OpenAI CLIP's 80 ImageNet templates plus the 5
# scene templates of the official lila/utils/zeroseg_init.py; "{}" is the class name.
CLIP_TEMPLATES = [t.strip() + "." for t in (
    "a bad photo of a {}|a photo of many {}|a sculpture of a {}|a photo of the hard to see {}|"
    "a low resolution photo of the {}|a rendering of a {}|graffiti of a {}|a bad photo of the {}|"
    "a cropped photo of the {}|a tattoo of a {}|the embroidered {}|a photo of a hard to see {}|"
    "a bright photo of a {}|a photo of a clean {}|a photo of a dirty {}|a dark photo of the {}|"
    "a drawing of a {}|a photo of my {}|the plastic {}|a photo of the cool {}|"
    "a close-up photo of a {}|a black and white photo of the {}|a painting of the {}|"
    "a painting of a {}|a pixelated photo of the {}|a sculpture of the {}|"
    "a bright photo of the {}|a cropped photo of a {}|a plastic {}|a photo of the dirty {}|"
    "a jpeg corrupted photo of a {}|a blurry photo of the {}|a photo of the {}|"
    "a good photo of the {}|a rendering of the {}|a {} in a video game|a photo of one {}|"
    "a doodle of a {}|a close-up photo of the {}|a photo of a {}|the origami {}|"
    "the {} in a video game|a sketch of a {}|a doodle of the {}|a origami {}|"
    "a low resolution photo of a {}|the toy {}|a rendition of the {}|a photo of the clean {}|"
    "a photo of a large {}|a rendition of a {}|a photo of a nice {}|a photo of a weird {}|"
    "a blurry photo of a {}|a cartoon {}|art of a {}|a sketch of the {}|a embroidered {}|"
    "a pixelated photo of a {}|itap of the {}|a jpeg corrupted photo of the {}|"
    "a good photo of a {}|a plushie {}|a photo of the nice {}|a photo of the small {}|"
    "a photo of the weird {}|the cartoon {}|art of the {}|a drawing of the {}|"
    "a photo of the large {}|a black and white photo of a {}|the plushie {}|"
    "a dark photo of a {}|itap of a {}|graffiti of the {}|a toy {}|itap of my {}|"
    "a photo of a cool {}|a photo of a small {}|a tattoo of the {}|"
    "there is a {} in the scene|there is the {} in the scene|this is a {} in the scene|"
    "this is the {} in the scene|this is one {} in the scene").split("|")]
assert len(CLIP_TEMPLATES) == 85


def clip_text_embeddings(names, device="cpu", templates=CLIP_TEMPLATES):
    """(C, 512) float32 CLIP ViT-B/32 text embeddings: per class, every template embedded and
    L2-normalised, averaged, L2-normalised again (official lila/utils/zeroseg_init.py). Needs
    OpenAI's `clip` or `open_clip` with its weights (downloaded by those packages)."""
    try:
        import clip
        net, _ = clip.load("ViT-B/32", device=device)
        tokenize = clip.tokenize
    except ImportError:
        try:
            import open_clip
            net, _, _ = open_clip.create_model_and_transforms("ViT-B-32", pretrained="openai", device=device)
            tokenize = open_clip.get_tokenizer("ViT-B-32")
        except ImportError:
            raise BenchmarkError("no CLIP package for the text embeddings: pass --text-embeddings "
                                 "FILE (.npy or .pt, one row per class id), or pip install "
                                 "git+https://github.com/openai/CLIP (or open_clip_torch)") from None
    rows = []
    with torch.no_grad():
        for name in names:
            e = net.encode_text(tokenize([t.format(name) for t in templates]).to(device)).float()
            e = F.normalize(F.normalize(e, dim=-1).mean(0), dim=0)           # (512,)
            rows.append(e.cpu())
    return torch.stack(rows).numpy()                                         # (C, 512)


# --- label maps and normals from files ---

def read_label_png(path, binary=False):
    """(H, W) int64 ids and the PNG's kind: 'indexed' (mode P, or grey ids) or, with binary=True
    (DAVIS masks only), 'binary' (a grey 0/255 mask: DAVIS-2016, returned as 0/1). Semantic maps
    never take that path: in COCO-Stuff's grey maps 0 is 'person' and 255 'unlabelled', so a
    map with only those two values is still ids. Colour (RGB) masks are refused."""
    try:
        with Image.open(path) as im:
            mode, pal = im.mode, im.getpalette()
            a = np.array(im)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise BenchmarkError(f"cannot read label map {path}: {type(e).__name__}: {e}") from None
    if a.ndim != 2:
        raise BenchmarkError(f"{path}: {mode} colour mask; expected an indexed (P) PNG of ids "
                             "(DAVIS-2017, COCO-Stuff, ADE20K) or a 0/255 grey mask (DAVIS-2016)")
    a = a.astype(np.int64)
    if binary and mode != "P" and a.max() == 255 and set(np.unique(a).tolist()) <= {0, 255}:
        return (a > 0).astype(np.int64), "binary", pal
    return a, "indexed", pal


def unit_normals(n):
    """(H, W, 3) normals -> unit vectors and validity (the zero vector marks 'no normal')."""
    n = np.asarray(n, np.float32)
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    valid = norm[..., 0] > 0.5
    return np.where(valid[..., None], n / np.maximum(norm, 1e-6), 0).astype(np.float32), valid


def load_image(path):
    """(H, W, 3) uint8 RGB with data.py's reader (any PIL mode); unreadable files fail."""
    import data
    try:
        return data.VideoFolder.load(path)
    except ValueError as e:
        raise BenchmarkError(str(e)) from None


# --- DAVIS ---

def davis_sequences(root):
    """(sequence names, data.VideoFolder) of a DAVIS root: ImageSets/2017/val.txt, else
    ImageSets/2016/val.txt, else ImageSets/480p/val.txt (DAVIS-2016 frame paths), else all."""
    import data
    try:
        vf = data.VideoFolder(root)
    except (FileNotFoundError, ValueError) as e:
        raise BenchmarkError(f"--data {root}: {e}") from None
    for lst in ("2017/val.txt", "2016/val.txt", "480p/val.txt"):
        p = os.path.join(root, "ImageSets", lst)
        if os.path.isfile(p):
            names = [l.split()[0].strip("/").split("/")[-2] if "/" in l else l.strip()
                     for l in open(p) if l.strip()]
            seqs = list(dict.fromkeys(names))                             # unique, in order
            missing = [q for q in seqs if q not in vf.videos]
            if missing:
                raise BenchmarkError(f"{p}: sequences without frames in {vf.image_dir}: {missing[:5]}")
            return seqs, vf
    return vf.videos, vf


def davis_annotation(root, seq, frame):
    return os.path.join(root, "Annotations", "480p", seq, Path(frame).stem + ".png")


# --- dense benchmarks: item readers ---

class Dense:
    """Base: items[i] = (image path or index, target path or index); subclasses read them."""
    task, num_classes, names, unseen, layout, repeat = None, None, None, (), "", 1
    antialias = True   # image resizing with antialiasing (torchvision) or without (cv2)

    def __len__(self):
        return len(self.items)

    def name(self, i):
        return str(self.items[i][0])


class VideoDense(Dense):
    """The synthetic layout: frames of videos + Normals/*.npz or Classes/*.png per frame."""
    layout = "video layout (synthetic scenes)"

    def __init__(self, root, task, split, val_videos=1, reduce_zero_label=False):
        seqs, vf = davis_sequences(root)
        tr = os.path.join(root, "ImageSets", "2017", "train.txt")
        n = len(vf.videos)
        if not os.path.isfile(tr) and split != "all" and not 0 < val_videos < n:
            raise BenchmarkError(f"--val-videos {val_videos}: {root} has {n} videos and no ImageSets/2017/"
                                 f"train.txt; hold out 1..{n - 1} of them (the rest train the probe)")
        if split == "train":
            seqs = [l.strip() for l in open(tr) if l.strip()] if os.path.isfile(tr) else vf.videos[:n - val_videos]
            va = os.path.join(root, "ImageSets", "2017", "val.txt")
            both = sorted(set(seqs) & {l.strip() for l in open(va)}) if os.path.isfile(tr) and os.path.isfile(va) else []
            if both:
                raise BenchmarkError(f"{tr}: {len(both)} training videos are also held out in ImageSets/2017/"
                                     f"val.txt ({both[:5]}): the probe would be scored on its training frames")
        elif split == "val" and not os.path.isfile(tr):
            seqs = vf.videos[n - val_videos:]
        if any(v not in vf.videos for v in seqs):
            raise BenchmarkError(f"{tr}: sequences without frames: {[v for v in seqs if v not in vf.videos][:5]}")
        sub, ext = ("Normals", ".npz") if task == "normals" else ("Classes", ".png")
        self.task, self.reduce, self.hide = task, reduce_zero_label, ()   # hide: see prepare_dense
        self.items = [(fp, os.path.join(root, sub, v, Path(fp).stem + ext)) for v in seqs for fp in vf.frames(v)]

    def __getitem__(self, i):
        ip, tp = self.items[i]
        if not os.path.isfile(tp):
            raise BenchmarkError(f"missing target {tp}")
        if self.task == "normals":
            try:
                n = np.load(tp)["normals"]
            except Exception as e:  # noqa: BLE001
                raise BenchmarkError(f"cannot read normals {tp}: {type(e).__name__}: {e}") from None
            if n.ndim != 3 or n.shape[2] != 3:
                raise BenchmarkError(f"{tp}: normals of shape {n.shape}; expected (H, W, 3)")
            n, valid = unit_normals(n)
            tgt = {"normals": n, "valid": valid}
        else:
            lab = read_label_png(tp)[0]
            if self.reduce:                       # ADE20K convention: 0 = ignore, k -> k - 1
                lab = np.where(lab == 0, VOID, lab - 1)
            if self.hide:                         # zero-shot training: unseen classes ignored
                lab = np.where(np.isin(lab, self.hide), VOID, lab)
            tgt = {"labels": lab}
        return same_size(ip, load_image(ip), tp, tgt)


class NYU(Dense):
    """NYUv2 surface normals: Probe3D's nyuv2_snorm_all.pkl (labelled 795 train / 654 test)
    or the official nyu_{split}_{image,depth,normal}.pkl. Valid pixels: depth > 0 (official
    angular_loss mask); Probe3D's reader also zeroes depth beyond 10 m. Repeat 10: one epoch is
    ten passes over the training images (official NormalsDataset.mult)."""
    task, layout, repeat = "normals", "NYUv2", 10

    def __init__(self, root, split):
        self.repeat = 10 if split == "train" else 1
        p3d = os.path.join(root, "nyuv2_snorm_all.pkl")
        if os.path.isfile(p3d):
            d = _pickle(p3d)
            key = "train_indices" if split == "train" else "test_indices"
            need = ("images", "depths", "snorms", key)
            if not isinstance(d, dict) or any(k not in d for k in need):
                raise BenchmarkError(f"{p3d}: expected a dict with {', '.join(need)}; found "
                                     f"{sorted(d)[:8] if isinstance(d, dict) else type(d).__name__}")
            try:
                idx = [int(i) for i in np.asarray(d[key]).ravel()]
                n = min(len(d["images"]), len(d["depths"]), len(d["snorms"]))
            except (TypeError, ValueError) as e:
                raise BenchmarkError(f"{p3d}: {key}, images, depths, snorms must be arrays ({e})") from None
            bad = [i for i in idx if not 0 <= i < n]
            if bad:
                raise BenchmarkError(f"{p3d}: {key} holds {len(bad)} indices outside 0..{n - 1} (e.g. {bad[0]})")
            self.images = [np.transpose(d["images"][i], (1, 2, 0)) for i in idx]      # (H, W, 3)
            self.depths = [np.where(d["depths"][i] > 10, 0, d["depths"][i]) for i in idx]
            self.normals = [np.transpose(d["snorms"][i], (1, 2, 0)) for i in idx]
            self.layout, self.source = "NYUv2 (Probe3D nyuv2_snorm_all.pkl)", p3d
        else:
            s = "train" if split == "train" else "val"
            paths = [os.path.join(root, f"nyu_{s}_{k}.pkl") for k in ("image", "depth", "normal")]
            self.images, self.depths, self.normals = (list(_pickle(p)) for p in paths)
            if not len(self.images) == len(self.depths) == len(self.normals):
                raise BenchmarkError(f"{root}: nyu_{s}_*.pkl hold {len(self.images)} images, {len(self.depths)} "
                                     f"depths and {len(self.normals)} normals; they must match")
            self.layout, self.source = "NYUv2 (official nyu_*.pkl)", os.path.join(root, f"nyu_{s}_*.pkl")
        self.items = [(f"NYUv2 {split} #{i}", i) for i in range(len(self.images))]

    def __getitem__(self, i):
        img = np.asarray(self.images[i])
        img = img if img.dtype == np.uint8 else np.clip(img, 0, 255).astype(np.uint8)
        n, depth = np.asarray(self.normals[i], np.float32), np.asarray(self.depths[i]).squeeze()
        if img.ndim != 3 or img.shape[2] != 3 or n.shape != img.shape or depth.shape != img.shape[:2]:
            raise BenchmarkError(f"{self.source}: {self.items[i][0]}: image {img.shape}, normals {n.shape}, "
                                 f"depth {depth.shape}; expected (H, W, 3), (H, W, 3), (H, W)")
        return img, {"normals": n, "valid": depth > 0}


def _pickle(path):
    if not os.path.isfile(path):
        raise BenchmarkError(f"missing {path}")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except Exception as e:  # noqa: BLE001 - truncated, not a pickle, or another format
        raise BenchmarkError(f"cannot read {path} ({type(e).__name__}: {e}); a truncated download? "
                             "fetch it again") from None


class CocoStuff(Dense):
    """COCO-Stuff-164k: 'coarse' = COCO-Stuff-27 (fine ids mapped by COCO_FINE_TO_COARSE),
    'fine' = the 182 fine ids (zero-shot; unseen ids set to ignore in the training split)."""
    antialias = False                                   # albumentations / cv2 linear resize

    def __init__(self, root, split, labels="coarse", file_list=None, unseen=()):
        s = "train2017" if split == "train" else "val2017"
        img_dir = next((d for d in (os.path.join(root, s), os.path.join(root, "images", s)) if os.path.isdir(d)), None)
        lab_dirs = [os.path.join(root, s), os.path.join(root, "stuffthingmaps_trainval2017", s),
                    os.path.join(root, "annotations", s)]
        lab_dir = next((d for d in lab_dirs if os.path.isdir(d) and any(n.endswith(".png") for n in os.listdir(d))), None)
        if img_dir is None or lab_dir is None:
            raise BenchmarkError(f"--data {root}: COCO-Stuff needs {s}/*.jpg and the stuffthingmaps "
                                 f"PNGs in {s}/, stuffthingmaps_trainval2017/{s}/ or annotations/{s}/")
        curated = os.path.join(root, "curated", s, "Coco164kFull_Stuff_Coarse.txt")
        file_list = file_list or (curated if labels == "coarse" and os.path.isfile(curated) else None)
        if file_list:
            try:
                ids = [Path(str(x)).stem for x in (np.load(file_list).ravel() if file_list.endswith(".npy") else
                                                   [l.strip() for l in open(file_list) if l.strip()])]
            except Exception as e:  # noqa: BLE001 - missing, unreadable or not a list
                raise BenchmarkError(f"cannot read the image list {file_list} ({type(e).__name__}: {e}); "
                                     "expected a .txt of image ids, one a line, or a .npy of file names") from None
            missing = [i for i in ids if not os.path.isfile(os.path.join(lab_dir, i + ".png"))]
            if missing:
                raise BenchmarkError(f"{file_list}: {len(missing)} of its {len(ids)} ids have no label map in "
                                     f"{lab_dir} (e.g. {missing[0]}.png)")
        else:
            ids = sorted(Path(n).stem for n in os.listdir(lab_dir) if n.endswith(".png"))
        self.items = [(os.path.join(img_dir, i + ".jpg"), os.path.join(lab_dir, i + ".png")) for i in ids]
        if labels == "coarse" and not file_list:   # the paper's numbers use the curated lists
            print(f"evaldata.py: warning: no {curated}: COCO-Stuff-27 {s} uses all {len(ids)} images, "
                  "not STEGO's curated list the published numbers use", file=sys.stderr)
        self.file_list, self.task = file_list, "semseg" if labels == "coarse" else "zeroshot"
        lut = np.full(256, VOID, np.int64)
        if labels == "coarse":
            lut[:182] = COCO_FINE_TO_COARSE
            self.num_classes = 27
            self.layout = f"COCO-Stuff-27 ({'list ' + os.path.basename(file_list) if file_list else 'all images'})"
        else:
            lut[:182] = np.arange(182)
            self.num_classes, self.names, self.unseen = 182, COCO_NAMES, tuple(unseen)
            self.layout = "COCO-Stuff (182 classes)"
            if split == "train":
                lut[list(self.unseen)] = VOID                # unseen classes never seen in training
        self.lut = lut

    def __getitem__(self, i):
        ip, lp = self.items[i]
        return same_size(ip, load_image(ip), lp, {"labels": self.lut[np.clip(read_label_png(lp)[0], 0, 255)]})


class ADE20K(Dense):
    """ADEChallengeData2016: 150 classes, label 0 ignored and k -> k - 1 (reduce-zero-label)."""
    task, num_classes, layout, antialias = "semseg", 150, "ADE20K", False

    def __init__(self, root, split):
        s = "training" if split == "train" else "validation"
        im, an = os.path.join(root, "images", s), os.path.join(root, "annotations", s)
        if not (os.path.isdir(im) and os.path.isdir(an)):
            raise BenchmarkError(f"--data {root}: ADE20K needs images/{s}/ and annotations/{s}/")
        self.items = [(os.path.join(im, n), os.path.join(an, Path(n).stem + ".png"))
                      for n in sorted(os.listdir(im)) if n.lower().endswith(".jpg")]

    def __getitem__(self, i):
        ip, lp = self.items[i]
        lab = read_label_png(lp)[0]
        if lab.max() > self.num_classes:
            raise BenchmarkError(f"{lp}: label {lab.max()}, but ADE20K has ids 0..{self.num_classes}")
        return same_size(ip, load_image(ip), lp, {"labels": np.where(lab == 0, VOID, lab - 1)})


def same_size(ip, img, tp, tgt):
    """(img, tgt), or an error naming both files when the target is not the image's size."""
    t = next(iter(tgt.values()))
    if t.shape[:2] != img.shape[:2]:
        raise BenchmarkError(f"{tp}: target {t.shape[1]}x{t.shape[0]} but image {ip} is {img.shape[1]}x{img.shape[0]}")
    return img, tgt


def open_dense(root, task, split, val_videos=1, reduce_zero_label=False, file_list=None, unseen=None):
    """The dataset of `task` ('normals' | 'semseg' | 'zeroshot') and split ('train' | 'val' |
    'all') found at root, recognised by its layout; a wrong layout is one line saying what
    was expected."""
    j = lambda *p: os.path.join(root, *p)  # noqa: E731
    video = os.path.isdir(j("JPEGImages")) and os.path.isdir(j("Normals" if task == "normals" else "Classes"))
    if task == "normals":
        if os.path.isfile(j("nyuv2_snorm_all.pkl")) or os.path.isfile(j("nyu_train_image.pkl")):
            return NYU(root, split)
        if video:
            return VideoDense(root, task, split, val_videos)
        raise BenchmarkError(f"--data {root}: expected NYUv2 (nyuv2_snorm_all.pkl from Probe3D, or "
                             "nyu_{train,val}_{image,depth,normal}.pkl) or the video layout "
                             "(JPEGImages/480p/<video>/ + Normals/<video>/*.npz)")
    if os.path.isdir(j("train2017")) or os.path.isdir(j("images", "train2017")) or os.path.isdir(j("val2017")):
        labels = "coarse" if task == "semseg" else "fine"
        return CocoStuff(root, split, labels, file_list, COCO_UNSEEN if unseen is None else unseen)
    if os.path.isdir(j("images", "training")) and task == "semseg":
        return ADE20K(root, split)
    if video:
        ds = VideoDense(root, task, split, val_videos, reduce_zero_label)
        if task == "zeroshot":
            ds.unseen = tuple(unseen or ())
        return ds
    want = ("COCO-Stuff (train2017/ + val2017/ with the stuffthingmaps PNGs), ADE20K "
            "(images/training/, annotations/training/) or " if task == "semseg" else
            "COCO-Stuff (train2017/ + val2017/ with the stuffthingmaps PNGs) or ")
    raise BenchmarkError(f"--data {root}: expected {want}the video layout (JPEGImages/480p/<video>/ + Classes/<video>/*.png)")


# --- views: the official crops and augmentations ---

def rrc_box(H, W, g, scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), attempts=10):
    """RandomResizedCrop box (top, left, h, w): area fraction ~ U(scale), log-aspect ~
    U(log ratio); centre crop with the ratio clamped if 10 draws do not fit (torchvision's
    RandomResizedCrop.get_params, also albumentations')."""
    area = H * W
    for _ in range(attempts):
        a = area * float(torch.empty(1).uniform_(*scale, generator=g))
        r = float(torch.exp(torch.empty(1).uniform_(np.log(ratio[0]), np.log(ratio[1]), generator=g)))
        w, h = int(round((a * r) ** 0.5)), int(round((a / r) ** 0.5))
        if 0 < w <= W and 0 < h <= H:
            top = int(torch.randint(0, H - h + 1, (1,), generator=g))
            left = int(torch.randint(0, W - w + 1, (1,), generator=g))
            return top, left, h, w
    r = W / H
    w, h = (W, int(round(W / ratio[0]))) if r < ratio[0] else (int(round(H * ratio[1])), H) if r > ratio[1] else (W, H)
    return (H - h) // 2, (W - w) // 2, h, w


def colour_jitter(img, g, brightness=0.3, contrast=0.3, saturation=0.2):
    """torchvision ColorJitter(0.3, 0.3, 0.2) (the official normals training): each factor ~
    U(1 - x, 1 + x), applied in a random order; img (3, H, W) in [0, 1]."""
    grey = lambda x: (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]  # noqa: E731  (1, H, W)
    for k in torch.randperm(3, generator=g).tolist():
        x = [brightness, contrast, saturation][k]
        f = float(torch.empty(1).uniform_(1 - x, 1 + x, generator=g))
        ref = 0.0 if k == 0 else grey(img).mean() if k == 1 else grey(img)
        img = (f * img + (1 - f) * ref).clamp(0, 1)
    return img


def _resize(x, size, mode, antialias):
    """x (C, H, W) float -> (C, *size); nearest for labels, bilinear (align_corners=False)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    kw = dict(align_corners=False, antialias=antialias) if mode == "bilinear" else {}
    return F.interpolate(x[None], size=size, mode=mode, **kw)[0]


def make_view(img, tgt, size, g=None, train=False, jitter=False, antialias=True, eval_scale=1.0):
    """One item -> (3, S, S) image in [0, 1] and its target tensors. Train (official
    SegDataset / NormalsDataset): RandomResizedCrop(S, scale 0.5-1, ratio 3/4-4/3), horizontal
    flip p=0.5 (normal-x negated), colour jitter for normals. Eval: short side resized to
    int(S * eval_scale) (normals: 1.1, else 1), centre crop S. Normals and validity are
    resized bilinearly (the official transforms treat them as images); labels nearest."""
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255  # (3, H, W)
    H, W = x.shape[-2:]
    normals = "normals" in tgt
    if normals:
        t = torch.from_numpy(np.ascontiguousarray(tgt["normals"])).permute(2, 0, 1).float()  # (3, H, W)
        v = torch.from_numpy(np.ascontiguousarray(tgt["valid"]))[None].float()             # (1, H, W)
    else:
        t = torch.from_numpy(np.ascontiguousarray(tgt["labels"]))[None].float()            # (1, H, W)
    if train:
        top, left, h, w = rrc_box(H, W, g)
        crop = lambda a: a[:, top:top + h, left:left + w]  # noqa: E731
        x = _resize(crop(x), (size, size), "bilinear", antialias)
        if normals:
            t, v = (_resize(crop(a), (size, size), "bilinear", True) for a in (t, v))
        else:
            t = _resize(crop(t), (size, size), "nearest", False)
        if float(torch.rand(1, generator=g)) < 0.5:
            x, t = x.flip(-1), t.flip(-1)
            v = v.flip(-1) if normals else None
            if normals:
                t = torch.cat([-t[:1], t[1:]])      # a mirrored surface faces the other way in x
        if jitter:
            x = colour_jitter(x, g)
    else:
        short = int(size * eval_scale)
        hw = (short, int(W * short / H)) if H <= W else (int(H * short / W), short)
        x = _resize(x, hw, "bilinear", antialias)
        if normals:
            t, v = (_resize(a, hw, "bilinear", True) for a in (t, v))
        else:
            t = _resize(t, hw, "nearest", False)
        top = int(round((hw[0] - size) / 2)) if normals else (hw[0] - size) // 2
        left = int(round((hw[1] - size) / 2)) if normals else (hw[1] - size) // 2
        x, t = x[:, top:top + size, left:left + size], t[:, top:top + size, left:left + size]
        v = v[:, top:top + size, left:left + size] if normals else None
    if normals:
        return {"image": x, "normals": t, "valid": v[0] > 0}
    return {"image": x, "labels": t[0].long()}


class Views(torch.utils.data.Dataset):
    """Views of a Dense dataset for a DataLoader: view k is item order[k] % len, with its
    randomness seeded by (seed, epoch, order[k]), so a resumed epoch sees the same crops."""

    def __init__(self, ds, size, train, order, seed=0, epoch=0, eval_scale=1.0):
        self.ds, self.size, self.train, self.order = ds, size, train, list(order)
        self.seed, self.epoch, self.eval_scale = seed, epoch, eval_scale

    def __len__(self):
        return len(self.order)

    def __getitem__(self, k):
        i = self.order[k] % len(self.ds)
        img, tgt = self.ds[i]
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + self.order[k])
        return make_view(img, tgt, self.size, g, self.train, jitter=self.train and self.ds.task == "normals",
                         antialias=self.ds.antialias, eval_scale=self.eval_scale)


def patch_hw(H, W, short, patch=14):
    """Input size of a frame: short side `short`, long side int(long * short / short_in)
    rounded to a multiple of the patch (official eval_base.PatchResample)."""
    if W < H:
        return int(round(int(H * short / W) / patch) * patch), short
    return short, int(round(int(W * short / H) / patch) * patch)
