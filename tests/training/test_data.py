"""Captioned-image loading: sources, the transform against torchvision, skipping, errors, streaming, seeded resume.

Every dataset is built in tmp_path from seeded uint8 arrays; comparisons are exact (atol = 0) unless stated.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import datasets
from ldm.config import ConfigError, from_dict
from ldm.training.data import (
    CaptionedImages,
    DataConfig,
    HubUnavailableError,
    ResumableSampler,
    build_dataloader,
    collate,
    load_records,
    samples_consumed,
)

# (width, height): already at resolution 8, needing a crop, needing a resize (bilinear, torchvision's size rule)
SIZES = [(8, 8), (12, 8), (8, 11), (16, 20), (21, 13), (9, 9), (10, 8)]
RES = 8


def _images(folder, n=len(SIZES)):
    """Write n seeded RGB PNGs (some RGBA/L to exercise the RGB conversion); return {name: PIL image}."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = {}
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        mode = ["RGB", "RGBA", "L"][i % 3]
        shape = (h, w) if mode == "L" else (h, w, len(mode))
        img = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)
        name = f"img{i:02d}.png"
        img.save(folder / name)
        out[name] = img
    return out


def _expected(img: Image.Image) -> torch.Tensor:
    """Reference transform: torchvision Resize(8, bilinear) + CenterCrop(8), then u / 127.5 - 1."""
    ref = T.Compose([T.Resize(RES, interpolation=T.InterpolationMode.BILINEAR), T.CenterCrop(RES)])(img.convert("RGB"))
    return torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1).float() / 127.5 - 1.0


def _folder(tmp_path, n=len(SIZES), corrupt=False, meta="jsonl", caption_key="text"):
    folder = tmp_path / "imgs"
    imgs = _images(folder, n)
    names = list(imgs)
    if corrupt:
        (folder / "zz_bad.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
        names.append("zz_bad.png")
    rows = [{"file_name": n, caption_key: f"caption of {n}"} for n in names]
    if meta == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        (folder / "metadata.csv").write_text(f"file_name,{caption_key}\n" + "".join(
            f"{r['file_name']},{r[caption_key]}\n" for r in rows))
    return folder, imgs


def _cfg(tmp_path, path, **kw) -> DataConfig:
    kw.setdefault("shuffle", False)
    return DataConfig(path=str(path), resolution=RES, cache_dir=str(tmp_path / "cache"), **kw)


def _all(loader):
    return [b for b in loader]


def _check_exact(batches, imgs, expect_count):
    seen = 0
    for b in batches:
        for pixels, cap in zip(b["pixel_values"], b["captions"]):
            name = cap.removeprefix("caption of ")
            assert pixels.shape == (3, RES, RES) and pixels.dtype == torch.float32
            assert torch.equal(pixels, _expected(imgs[name])), name  # pixel-exact, atol 0
            seen += 1
    assert seen == expect_count


@pytest.mark.parametrize("meta", ["jsonl", "csv"])
def test_imagefolder_pixel_exact_against_torchvision(tmp_path, meta):
    folder, imgs = _folder(tmp_path, meta=meta)
    loader, _ = build_dataloader(_cfg(tmp_path, folder), batch_size=3)
    batches = _all(loader)
    _check_exact(batches, imgs, len(imgs))
    assert sorted(c for b in batches for c in b["captions"]) == sorted(f"caption of {n}" for n in imgs)
    assert all(-1.0 <= b["pixel_values"].min() and b["pixel_values"].max() <= 1.0 for b in batches)


def test_csv_relative_and_absolute_paths_and_caption_column(tmp_path):
    imgs = _images(tmp_path / "data" / "pics", 4)
    lines = ["path,prompt,other"]
    for k, name in enumerate(imgs):
        p = f"pics/{name}" if k % 2 else str((tmp_path / "data" / "pics" / name).resolve())
        lines.append(f"{p},caption of {name},x{k}")
    (tmp_path / "data" / "list.csv").write_text("\n".join(lines) + "\n")
    cfg = _cfg(tmp_path, tmp_path / "data" / "list.csv", source="csv", image_column="path", caption_column="prompt")
    loader, _ = build_dataloader(cfg, batch_size=2)
    _check_exact(_all(loader), imgs, 4)


def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path):
    folder, imgs = _folder(tmp_path, n=5, corrupt=True)
    loader, _ = build_dataloader(_cfg(tmp_path, folder), batch_size=2)
    batches = _all(loader)
    _check_exact(batches, imgs, 5)
    assert sum(int(b["num_skipped"]) for b in batches) == 1
    assert loader.dataset.num_skipped == 1  # num_workers=0: the counter lives in this process
    # a CSV row pointing at a file that does not exist is skipped the same way
    (tmp_path / "l.csv").write_text(f"image,text\n{folder / 'img00.png'},a\nnope.png,b\n")
    loader, _ = build_dataloader(_cfg(tmp_path, tmp_path / "l.csv", source="csv"), batch_size=4)
    (b,) = _all(loader)
    assert b["captions"] == ["a"] and int(b["num_skipped"]) == 1
    # a batch where every image is unreadable is empty, not an error
    empty = collate([None, None])
    assert empty["pixel_values"].shape[0] == 0 and int(empty["num_skipped"]) == 2


def test_clear_errors(tmp_path, monkeypatch):
    folder, _ = _folder(tmp_path, n=2)
    with pytest.raises(KeyError, match=r"caption_column 'prompt'.*available columns: \['image', 'text'\]"):
        load_records(_cfg(tmp_path, folder, caption_column="prompt"))
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        load_records(_cfg(tmp_path, tmp_path / "missing"))
    with pytest.raises(FileNotFoundError, match="CSV file not found"):
        load_records(_cfg(tmp_path, tmp_path / "missing.csv", source="csv"))
    with pytest.raises(ValueError, match="path is empty"):
        DataConfig()
    with pytest.raises(ConfigError, match=r"DataConfig.crop: 'diagonal' is not one of \['center', 'random'\]"):
        from_dict(DataConfig, {"path": "x", "crop": "diagonal"})
    assert from_dict(DataConfig, {"path": "x", "max_samples": None, "crop": "random"}).crop == "random"
    # hub: force offline mode (read at import time by datasets and huggingface_hub, hence the patches)
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailableError, match="(?s)Hub is unreachable.*source='imagefolder'"):
        load_records(_cfg(tmp_path, "someone/definitely-not-cached-captions", source="hub"))


def test_streaming_matches_map_style(tmp_path):
    folder, imgs = _folder(tmp_path, corrupt=True)
    ref, _ = build_dataloader(_cfg(tmp_path, folder), batch_size=3)
    stream, _ = build_dataloader(_cfg(tmp_path, folder, streaming=True), batch_size=3)
    assert isinstance(stream.dataset, torch.utils.data.IterableDataset)
    a, b = _all(ref), _all(stream)
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert x["captions"] == y["captions"] and torch.equal(x["pixel_values"], y["pixel_values"])
        assert torch.equal(x["indices"], y["indices"]) and int(x["num_skipped"]) == int(y["num_skipped"])
    # shuffled streaming (buffer shuffle) draws the same multiset of samples
    shuf, _ = build_dataloader(_cfg(tmp_path, folder, streaming=True, shuffle=True, seed=3), batch_size=3)
    assert sorted(c for bb in _all(shuf) for c in bb["captions"]) == sorted(c for bb in a for c in bb["captions"])
    # max_samples keeps the same first records in both modes
    m1, _ = build_dataloader(_cfg(tmp_path, folder, max_samples=4), batch_size=8)
    m2, _ = build_dataloader(_cfg(tmp_path, folder, max_samples=4, streaming=True), batch_size=8)
    assert _all(m1)[0]["captions"] == _all(m2)[0]["captions"] and len(_all(m1)[0]["captions"]) == 4


def test_random_crop_flip_seeded_and_valid(tmp_path):
    folder, imgs = _folder(tmp_path)
    cfg = _cfg(tmp_path, folder, crop="random", random_flip=True, seed=7)
    records, base = load_records(cfg)
    ds = CaptionedImages(records, cfg, base)
    again = CaptionedImages(records, cfg, base)
    other = CaptionedImages(records, dataclasses.replace(cfg, seed=8), base)
    name = "img03.png"  # 16x20 -> resized to 8x10: three vertical offsets, and flips
    i = [r["image"]["path"].endswith(name) for r in records].index(True)
    resized = np.asarray(T.Resize(RES)(imgs[name].convert("RGB")))  # (10, 8, 3)
    candidates = {}
    for top in range(resized.shape[0] - RES + 1):
        for flip in (False, True):
            crop = resized[top:top + RES, :RES]
            crop = crop[:, ::-1] if flip else crop
            candidates[(top, flip)] = torch.from_numpy(crop.copy()).permute(2, 0, 1).float() / 127.5 - 1.0
    seen = set()
    n_epochs = 40
    for epoch in range(n_epochs):
        x = ds[(epoch, i)]["pixel_values"]
        assert torch.equal(x, again[(epoch, i)]["pixel_values"])  # same (seed, epoch, index): same augmentation
        hits = [k for k, c in candidates.items() if torch.equal(x, c)]
        assert hits, "random crop/flip must be an exact crop of the resized image"
        seen.update(hits)
    # 6 outcomes, 40 seeded draws: P(some outcome never drawn) <= 6 * (5/6)^40 ~ 4e-3 for a fair draw
    assert seen == set(candidates)
    diff = sum(not torch.equal(ds[(e, i)]["pixel_values"], other[(e, i)]["pixel_values"]) for e in range(10))
    assert diff > 0  # another seed gives other draws (P(all 10 equal) ~ 1e-8 for fair draws)


def _flat(batches):
    return [c for b in batches for c in b["captions"]]


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_mid_epoch_yields_exactly_the_rest(tmp_path, streaming):
    folder, _ = _folder(tmp_path, corrupt=True)  # 8 records, one unreadable
    cfg = _cfg(tmp_path, folder, shuffle=True, seed=5, streaming=streaming, shuffle_buffer=4)
    loader, pos = build_dataloader(cfg, batch_size=3)
    reference = {}
    for epoch in range(2):
        pos.set_epoch(epoch)
        reference[epoch] = _flat(_all(loader))
    assert len(set(reference[0])) == 7 and sorted(reference[0]) == sorted(reference[1])  # the 7 readable ones
    assert reference[0] != reference[1]  # a new order each epoch (8! orders; fixed seed, so deterministic)
    loader, pos = build_dataloader(cfg, batch_size=3)
    pos.set_epoch(1)
    it = iter(loader)
    first = [next(it)]
    state = pos.state_dict(samples_consumed(1, 3))
    del it
    assert state["epoch"] == 1 and state["index"] == 3
    loader2, pos2 = build_dataloader(cfg, batch_size=3)
    pos2.load_state_dict(state)
    rest = []
    for epoch in range(pos2.epoch, 2):
        pos2.set_epoch(epoch)
        rest += _all(loader2)
    assert _flat(first) + _flat(rest) == reference[1]


def test_map_style_epoch_boundary_and_mismatch(tmp_path):
    s = ResumableSampler(6, seed=1)
    s.set_epoch(2)
    assert s.state_dict(samples_consumed(2, 3)) == {"epoch": 3, "index": 0, "seed": 1, "num_samples": 6}
    t = ResumableSampler(6, seed=1)
    t.load_state_dict({"epoch": 2, "index": 4, "seed": 1, "num_samples": 6})
    t.set_epoch(2)
    assert list(t) == [(2, i) for i in s.order(2)[4:]] and len(t) == 2
    t.set_epoch(3)
    assert [i for _, i in t] == s.order(3)
    with pytest.raises(ValueError, match="seed"):
        ResumableSampler(6, seed=2).load_state_dict(s.state_dict())


def _sharded(cfg, batch_size, num_processes, num_workers=0):
    """One prepared loader per simulated process (accelerate's own sharding, dispatch_batches=False)."""
    from accelerate.data_loader import prepare_data_loader

    out = []
    for p in range(num_processes):
        loader, pos = build_dataloader(cfg, batch_size, num_processes=num_processes, num_workers=num_workers)
        out.append((prepare_data_loader(loader, num_processes=num_processes, process_index=p, put_on_device=False,
                                        dispatch_batches=False), pos))
    return out


@pytest.mark.parametrize("streaming,workers", [(False, 0), (True, 0), (True, 2)])
def test_resume_under_accelerate_sharding(tmp_path, streaming, workers):
    """Two processes: step s gives global batches 2s and 2s+1; resume after 1 step sees exactly the rest."""
    _images(tmp_path / "imgs", 12)
    (tmp_path / "imgs" / "metadata.jsonl").write_text(
        "".join(json.dumps({"file_name": f"img{i:02d}.png", "text": f"c{i}"}) + "\n" for i in range(12)))
    cfg = _cfg(tmp_path, tmp_path / "imgs", shuffle=True, seed=11, streaming=streaming, shuffle_buffer=5)
    single, pos = build_dataloader(cfg, batch_size=2)
    pos.set_epoch(1)
    reference = [b["captions"] for b in _all(single)]  # 6 global batches of 2
    procs = _sharded(cfg, 2, 2, workers)
    steps = []
    for loader, _ in procs:
        loader.set_epoch(1)
        steps.append([b["captions"] for b in _all(loader)])
    assert [steps[p][s] for s in range(3) for p in range(2)] == reference
    # resume: each process consumed 1 step; the saved position is 1 * 2 * 2 records
    procs = _sharded(cfg, 2, 2, workers)
    state = None
    for loader, p in procs:
        loader.set_epoch(1)
        next(iter(loader))
        state = p.state_dict(samples_consumed(1, batch_size=2, num_processes=2))
    assert state["index"] == 4
    resumed = _sharded(cfg, 2, 2, workers)
    rest = []
    for loader, p in resumed:
        p.load_state_dict(state)
        loader.set_epoch(p.epoch)  # the prepared loader forwards it and keeps accelerate's counter in step
        rest.append([b["captions"] for b in _all(loader)])
    assert [rest[p][s] for s in range(2) for p in range(2)] == reference[2:]


@pytest.mark.parametrize("streaming", [False, True])
def test_workers_keep_the_order_and_report_skips(tmp_path, streaming):
    folder, _ = _folder(tmp_path, corrupt=True)
    cfg = _cfg(tmp_path, folder, shuffle=True, seed=2, streaming=streaming, shuffle_buffer=3)
    ref, _ = build_dataloader(cfg, batch_size=2)
    par, _ = build_dataloader(cfg, batch_size=2, num_workers=2)
    a, b = _all(ref), _all(par)
    assert [x["captions"] for x in a] == [y["captions"] for y in b]
    assert all(torch.equal(x["pixel_values"], y["pixel_values"]) for x, y in zip(a, b))
    assert sum(int(y["num_skipped"]) for y in b) == 1  # counted in a worker, reported through the batch
