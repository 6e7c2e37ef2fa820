"""Tests of evaldata.py: each reader on a tiny stand-in of its released layout (COCO-Stuff
with the 27-class coarse map and the zero-shot unseen classes, ADE20K, Probe3D's NYUv2
pickle, DAVIS-2016 0/255 masks), refused colour masks and wrong layouts, numeric frame order,
and the official crops (flip negates normal-x, centre crops, deterministic views)."""
import os
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import evaldata as bm  # noqa: E402


def save_ids(path, ids, mode="P"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    im = Image.fromarray(np.asarray(ids, np.uint8), mode=mode)
    if mode == "P":
        im.putpalette([v for i in range(256) for v in (i, i, i)])
    im.save(path)


def save_jpg(path, h, w):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


# fine COCO-Stuff ids and their COCO-Stuff-27 classes: person -> person (9), bicycle -> vehicle
# (11), cow -> animal (7), grass -> plant (22), sky-other -> sky (23), wood -> solid (24),
# unlabelled 255 and ids outside 0..181 -> ignore
KNOWN = {0: 9, 1: 11, 20: 7, 123: 22, 156: 23, 181: 24, 255: 255, 200: 255}


def test_cocostuff_reader_maps_fine_ids_to_the_27_coarse_classes(tmp_path, capsys):
    ids = np.array([list(KNOWN)], np.uint8)              # (1, 8)
    for split in ("train2017", "val2017"):
        for name in ("000001", "000003"):
            save_jpg(tmp_path / split / f"{name}.jpg", 1, 8)
            save_ids(tmp_path / split / f"{name}.png", ids, mode="L")   # stuffthingmaps: grey ids
    ds = bm.open_dense(str(tmp_path), "semseg", "val")
    assert ds.num_classes == 27 and ds.layout == "COCO-Stuff-27 (all images)" and len(ds) == 2
    assert ds[0][1]["labels"][0].tolist() == list(KNOWN.values())
    assert "uses all 2 images, not STEGO's curated list" in capsys.readouterr().err
    # the curated list, where present, picks the images (and says so in the layout)
    os.makedirs(tmp_path / "curated" / "val2017")
    (tmp_path / "curated" / "val2017" / "Coco164kFull_Stuff_Coarse.txt").write_text("000003\n")
    ds = bm.open_dense(str(tmp_path), "semseg", "val")
    assert len(ds) == 1 and ds.items[0][0].endswith("000003.jpg") and "Coarse.txt" in ds.layout
    assert capsys.readouterr().err == ""


def test_cocostuff_map_of_only_person_and_unlabelled_is_not_a_binary_mask(tmp_path):
    # grey stuffthingmaps holding only 0 (person) and 255 (unlabelled): the values of a
    # DAVIS-2016 mask, but ids; read as 0/1 they would make unlabelled pixels 'bicycle'
    for split in ("train2017", "val2017"):
        save_jpg(tmp_path / split / "000002.jpg", 1, 4)
        save_ids(tmp_path / split / "000002.png", [[0, 255, 255, 0]], mode="L")
    semseg, zeroshot = (bm.open_dense(str(tmp_path), t, "val") for t in ("semseg", "zeroshot"))
    assert semseg[0][1]["labels"][0].tolist() == [9, 255, 255, 9]
    assert zeroshot[0][1]["labels"][0].tolist() == [0, 255, 255, 0]


def test_cocostuff_zeroshot_hides_the_15_unseen_classes_in_training_only(tmp_path):
    ids = np.array([[20, 24, 0, 255]], np.uint8)         # cow, giraffe (unseen), person, void
    for split in ("train2017", "val2017"):
        save_jpg(tmp_path / "images" / split / "a.jpg", 1, 4)
        save_ids(tmp_path / "stuffthingmaps_trainval2017" / split / "a.png", ids, mode="L")
    tr, va = (bm.open_dense(str(tmp_path), "zeroshot", s) for s in ("train", "val"))
    assert tr[0][1]["labels"][0].tolist() == [255, 255, 0, 255]
    assert va[0][1]["labels"][0].tolist() == [20, 24, 0, 255] and va.num_classes == 182
    assert len(bm.COCO_UNSEEN) == 15 and [bm.COCO_NAMES[i] for i in (20, 24, 171)] == ["cow", "giraffe", "wall-concrete"]


def test_ade20k_reader_reduces_the_zero_label(tmp_path):
    for split in ("training", "validation"):
        save_jpg(tmp_path / "images" / split / "ADE_1.jpg", 1, 3)
        save_ids(tmp_path / "annotations" / split / "ADE_1.png", [[0, 1, 150]], mode="L")
    ds = bm.open_dense(str(tmp_path), "semseg", "val")
    assert ds.num_classes == 150 and ds[0][1]["labels"][0].tolist() == [255, 0, 149]


def test_nyu_probe3d_pickle_reader_splits_and_masks_by_depth(tmp_path):
    rng = np.random.default_rng(0)
    depth = np.full((3, 4, 5), 2.0)
    depth[0, 0, 0], depth[0, 0, 1] = 0.0, 12.0           # no depth / beyond 10 m: invalid
    d = {"images": rng.integers(0, 255, (3, 3, 4, 5), dtype=np.uint8), "depths": depth,
         "snorms": rng.normal(size=(3, 3, 4, 5)).astype(np.float32),
         "train_indices": np.array([0, 1]), "test_indices": np.array([2])}
    with open(tmp_path / "nyuv2_snorm_all.pkl", "wb") as f:
        pickle.dump(d, f)
    tr, va = bm.open_dense(str(tmp_path), "normals", "train"), bm.open_dense(str(tmp_path), "normals", "val")
    assert (len(tr), len(va), tr.repeat) == (2, 1, 10)
    img, tgt = tr[0]
    assert img.shape == (4, 5, 3) and tgt["normals"].shape == (4, 5, 3)
    assert tgt["valid"].sum() == 18 and not tgt["valid"][0, 0] and not tgt["valid"][0, 1]
    assert np.array_equal(va[0][0], np.transpose(d["images"][2], (1, 2, 0)))


def test_wrong_layout_is_one_line_naming_what_was_expected(tmp_path):
    with pytest.raises(ValueError, match="expected NYUv2") as e:
        bm.open_dense(str(tmp_path), "normals", "train")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="COCO-Stuff .* ADE20K"):
        bm.open_dense(str(tmp_path), "semseg", "train")


def test_label_pngs_indexed_binary_and_colour(tmp_path):
    save_ids(tmp_path / "p.png", [[0, 1, 2, 255]])
    save_ids(tmp_path / "b.png", [[0, 255, 255, 0]], mode="L")   # DAVIS-2016
    save_ids(tmp_path / "g.png", [[0, 1, 2, 1]], mode="L")
    Image.new("RGB", (2, 2), (128, 0, 0)).save(tmp_path / "c.png")
    assert bm.read_label_png(tmp_path / "p.png")[:2][1] == "indexed"
    m, kind, _ = bm.read_label_png(tmp_path / "b.png", binary=True)
    assert kind == "binary" and m.tolist() == [[0, 1, 1, 0]]
    m, kind, _ = bm.read_label_png(tmp_path / "b.png")           # a semantic map: ids as they are
    assert kind == "indexed" and m.tolist() == [[0, 255, 255, 0]]
    assert bm.read_label_png(tmp_path / "g.png")[0].tolist() == [[0, 1, 2, 1]]
    with pytest.raises(ValueError, match="RGB colour mask"):
        bm.read_label_png(tmp_path / "c.png")


def test_frame_names_sort_numerically():
    assert sorted(["10.jpg", "2.jpg", "1.jpg", "b.jpg", "a10.jpg", "a9.jpg"], key=bm.natural_key) == \
        ["1.jpg", "2.jpg", "10.jpg", "a9.jpg", "a10.jpg", "b.jpg"]


def test_random_resized_crop_stays_inside_and_in_range():
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = bm.rrc_box(48, 64, g)
        assert 0 <= top and top + h <= 48 and 0 <= left and left + w <= 64
        assert 0.5 * 48 * 64 * 0.9 <= h * w <= 48 * 64 and 0.7 <= w / h <= 1.4


def test_train_flip_negates_normal_x_with_the_mirrored_image():
    ramp = np.tile(np.arange(64, dtype=np.uint8) * 4, (48, 1))          # brighter to the right
    img = np.stack([ramp] * 3, -1)
    n = np.zeros((48, 64, 3), np.float32)
    n[..., 0] = 1.0                                                     # every normal faces right
    flips = set()
    for seed in range(12):
        v = bm.make_view(img, {"normals": n, "valid": np.ones((48, 64), bool)}, 28,
                         torch.Generator().manual_seed(seed), train=True)
        mirrored = bool(v["image"][0, 14, 0] > v["image"][0, 14, -1])
        assert torch.allclose(v["normals"][0], torch.full((28, 28), -1.0 if mirrored else 1.0))
        flips.add(mirrored)
    assert flips == {True, False}


def test_eval_views_are_centre_crops():
    img = np.zeros((40, 60, 3), np.uint8)
    lab = np.arange(60)[None].repeat(40, 0)                             # column index
    v = bm.make_view(img, {"labels": lab}, 20, train=False)             # short side 20: 20 x 30
    assert v["image"].shape == (3, 20, 20) and v["labels"][0].tolist() == [2 * c for c in range(5, 25)]
    n = bm.make_view(img, {"normals": np.ones((40, 60, 3), np.float32), "valid": np.ones((40, 60), bool)},
                     20, train=False, eval_scale=1.1)                   # normals: 22 x 33, crop 20
    assert n["normals"].shape == (3, 20, 20) and bool(n["valid"].all())


def test_views_are_deterministic_per_seed_epoch_and_position():
    class One(bm.Dense):
        task, items = "semseg", [("a", None)]

        def __getitem__(self, i):
            return np.random.default_rng(1).integers(0, 255, (30, 40, 3), dtype=np.uint8), {"labels": np.zeros((30, 40), np.int64)}
    a = bm.Views(One(), 14, True, [0, 0], seed=3, epoch=1)
    b = bm.Views(One(), 14, True, [0, 0], seed=3, epoch=1)
    c = bm.Views(One(), 14, True, [0, 0], seed=3, epoch=2)
    assert torch.equal(a[1]["image"], b[1]["image"]) and not torch.equal(a[1]["image"], c[1]["image"])


def test_clip_text_embeddings_average_the_normalised_template_embeddings(monkeypatch):
    """With a stand-in `clip` package: per class, every prompt embedded and L2-normalised,
    the mean L2-normalised again (official lila/utils/zeroseg_init.py)."""
    import types
    seen = []

    class Net:
        def encode_text(self, tokens):                   # one fixed vector per prompt
            return torch.stack([torch.tensor([float(len(p)), 1.0, 0.0]) for p in tokens])

    class Tokens(list):
        def to(self, device):
            return self

    fake = types.SimpleNamespace(load=lambda name, device: (Net(), None),
                                 tokenize=lambda prompts: (seen.extend(prompts), Tokens(prompts))[1])
    monkeypatch.setitem(sys.modules, "clip", fake)
    e = bm.clip_text_embeddings(["cow", "road"], templates=["a {}.", "the big {} here."])
    want = [torch.nn.functional.normalize(torch.nn.functional.normalize(torch.tensor(
        [[len(f"a {c}."), 1.0, 0.0], [len(f"the big {c} here."), 1.0, 0.0]]), dim=1).mean(0), dim=0)
        for c in ("cow", "road")]
    assert np.allclose(e, torch.stack(want).numpy(), atol=1e-6) and seen[:2] == ["a cow.", "the big cow here."]
    assert len(bm.CLIP_TEMPLATES) == 85 and all(t.count("{}") == 1 for t in bm.CLIP_TEMPLATES)


def test_every_augmentation_default_is_the_official_value():
    import inspect
    d = lambda fn: {k: p.default for k, p in inspect.signature(fn).parameters.items()  # noqa: E731
                    if p.default is not p.empty}
    assert d(bm.rrc_box) == dict(scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), attempts=10)   # RandomResizedCrop
    assert d(bm.colour_jitter) == dict(brightness=0.3, contrast=0.3, saturation=0.2)    # NormalsDataset
    assert d(bm.patch_hw) == dict(patch=14)
    assert bm.NYU.repeat == 10                                            # NormalsDataset.mult
    assert len(bm.COCO_UNSEEN) == 15 and bm.VOID == 255


# --- bad datasets: one error naming the file, never a traceback from deep inside ---

def nyu_pickle(path, **change):
    rng = np.random.default_rng(0)
    d = {"images": rng.integers(0, 255, (3, 3, 4, 5), dtype=np.uint8), "depths": np.full((3, 4, 5), 2.0),
         "snorms": rng.normal(size=(3, 3, 4, 5)).astype(np.float32),
         "train_indices": np.array([0, 1]), "test_indices": np.array([2])}
    d.update(change)
    d = {k: v for k, v in d.items() if v is not None}
    with open(path, "wb") as f:
        pickle.dump(d, f)


@pytest.mark.parametrize("change,message", [
    (dict(snorms=None), "expected a dict with images, depths, snorms, train_indices"),
    (dict(train_indices=np.array([0, 7])), "indices outside 0..2"),
    (dict(snorms=np.zeros((3, 3, 2, 5), np.float32)), "normals (2, 5, 3)"),
])
def test_nyu_with_a_missing_key_an_index_out_of_range_or_normals_of_another_size(tmp_path, change, message):
    nyu_pickle(tmp_path / "nyuv2_snorm_all.pkl", **change)
    with pytest.raises(bm.BenchmarkError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        ds = bm.open_dense(str(tmp_path), "normals", "train")
        ds[0]
    assert "nyuv2_snorm_all.pkl" in str(e.value)


def test_nyu_truncated_file_names_the_file(tmp_path):
    nyu_pickle(tmp_path / "nyuv2_snorm_all.pkl")
    data = (tmp_path / "nyuv2_snorm_all.pkl").read_bytes()
    (tmp_path / "nyuv2_snorm_all.pkl").write_bytes(data[:len(data) // 2])
    with pytest.raises(bm.BenchmarkError, match="cannot read .*nyuv2_snorm_all.pkl .*truncated"):
        bm.open_dense(str(tmp_path), "normals", "train")


def test_label_map_of_the_wrong_size_and_label_beyond_the_classes_name_the_file(tmp_path):
    for split in ("training", "validation"):
        save_jpg(tmp_path / "images" / split / "ADE_1.jpg", 2, 3)
        save_ids(tmp_path / "annotations" / split / "ADE_1.png", [[0, 1, 150]], mode="L")   # 1x3, image 2x3
    with pytest.raises(bm.BenchmarkError, match="ADE_1.png: target 3x1 but image .*ADE_1.jpg is 3x2"):
        bm.open_dense(str(tmp_path), "semseg", "val")[0]
    save_ids(tmp_path / "annotations" / "validation" / "ADE_1.png", [[0, 1, 151], [0, 0, 0]], mode="L")
    with pytest.raises(bm.BenchmarkError, match="ADE_1.png: label 151, but ADE20K has ids 0..150"):
        bm.open_dense(str(tmp_path), "semseg", "val")[0]


def test_a_split_larger_than_the_data_is_refused(tmp_path):
    import data
    data.write_synthetic(tmp_path, videos=3, frames=2, size=28, seed=0)
    for v in (3, 5, 0):                                   # all, more than all, none held out
        with pytest.raises(bm.BenchmarkError, match=f"--val-videos {v}: .* has 3 videos .*hold out 1..2"):
            bm.open_dense(str(tmp_path), "semseg", "train", val_videos=v)
    assert len(bm.open_dense(str(tmp_path), "semseg", "val", val_videos=2)) == 4
    (tmp_path / "ImageSets/2017/train.txt").write_text("synth0000\n")   # also in val.txt
    with pytest.raises(bm.BenchmarkError, match="also held out in ImageSets/2017/val.txt"):
        bm.open_dense(str(tmp_path), "semseg", "train")


def test_video_normals_of_the_wrong_shape_name_the_file(tmp_path):
    import data
    data.write_synthetic(tmp_path, videos=2, frames=2, size=28, seed=0)
    np.savez(tmp_path / "Normals/synth0000/00000.npz", normals=np.zeros((28, 28), np.float16))
    with pytest.raises(bm.BenchmarkError, match="00000.npz: normals of shape \\(28, 28\\)"):
        bm.open_dense(str(tmp_path), "normals", "train")[0]


def test_a_cocostuff_image_list_unreadable_or_naming_absent_images_names_the_file(tmp_path):
    for split in ("train2017", "val2017"):
        save_jpg(tmp_path / split / "000001.jpg", 1, 8)
        save_ids(tmp_path / split / "000001.png", np.zeros((1, 8)), mode="L")
    (tmp_path / "bad.npy").write_bytes(b"not an npy file")
    with pytest.raises(bm.BenchmarkError, match="cannot read the image list .*bad.npy"):
        bm.open_dense(str(tmp_path), "semseg", "val", file_list=str(tmp_path / "bad.npy"))
    (tmp_path / "list.txt").write_text("000001\n000002\n")
    with pytest.raises(bm.BenchmarkError, match="list.txt: 1 of its 2 ids have no label map"):
        bm.open_dense(str(tmp_path), "semseg", "val", file_list=str(tmp_path / "list.txt"))
