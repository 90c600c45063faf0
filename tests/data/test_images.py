"""data/images.py: finding unreadable images, with progress on long reads."""

from __future__ import annotations

import pytest
from PIL import Image

from cwps_lightning.data import DataConfigError
from cwps_lightning.data import images as images_module
from cwps_lightning.data.images import ImageListDataset, find_unreadable


def test_find_unreadable_names_the_bad_files_and_reports_progress(tmp_path):
    paths = []
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    (tmp_path / "junk.png").write_bytes(b"not an image")
    paths.append(str(tmp_path / "junk.png"))
    seen = []
    bad = find_unreadable(paths, full=True, workers=2, every=0.0,
                          progress=lambda done, total, seconds: seen.append((done, total)))
    assert [p for p, _ in bad] == [str(tmp_path / "junk.png")]
    assert seen == [(n, 4) for n in range(1, 5)]  # (every 0 s: after each image, in order)
    seen.clear()
    find_unreadable(paths, full=True, every=3600.0, progress=lambda *a: seen.append(a))
    assert seen == []  # (a read shorter than `every` says nothing)


def test_find_unreadable_says_why_in_one_short_line(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    bad = dict(find_unreadable([str(tmp_path / n) for n in ("ok.png", "gone.png", "junk.png")],
                               full=False))
    assert bad.keys() == {str(tmp_path / "gone.png"), str(tmp_path / "junk.png")}
    assert bad[str(tmp_path / "gone.png")] == "no such file"
    assert bad[str(tmp_path / "junk.png")].startswith("UnidentifiedImageError: ")


def test_find_unreadable_reports_progress_once_per_interval(tmp_path, monkeypatch):
    """(a clock that moves one second per reading: every 3 s is every third image)"""
    class Clock:
        now = 0.0

        def monotonic(self):
            self.now += 1.0
            return self.now

    monkeypatch.setattr(images_module, "time", Clock())
    paths = []
    for i in range(10):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    seen = []
    find_unreadable(paths, full=False, workers=1, every=3.0,
                    progress=lambda done, total, seconds: seen.append(done))
    assert seen == [3, 6, 9]


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "I;16", "CMYK"])
def test_image_list_dataset_gives_rgb_images(tmp_path, mode):
    path = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    Image.new(mode, (6, 4)).save(path)
    img, label = ImageListDataset([str(path)], [3])[0]
    assert img.mode == "RGB" and img.size == (6, 4) and label == 3


def test_skip_corrupt_wraps_around_and_fails_when_nothing_reads(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    ok, junk = str(tmp_path / "ok.png"), str(tmp_path / "junk.png")
    ds = ImageListDataset([ok, junk], [0, 1], skip_corrupt=True)
    img, label = ds[1]  # the last one: its replacement is the first
    assert label == 0 and img.size == (8, 8)
    with pytest.raises(DataConfigError, match=f"no readable image among 2 \\(first {junk}\\)"):
        ImageListDataset([junk, junk], [0, 1], skip_corrupt=True)[0]


def test_an_image_skipped_again_is_said_once(tmp_path, caplog):
    """(every epoch read it again, and said it again)"""
    Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    (tmp_path / "junk.png").write_bytes(b"not an image")
    (tmp_path / "junk2.png").write_bytes(b"not one either")
    paths = [str(tmp_path / n) for n in ("ok.png", "junk.png", "junk2.png")]
    ds = ImageListDataset(paths, [0, 1, 2], skip_corrupt=True)
    with caplog.at_level("WARNING", logger=images_module.__name__):
        for _ in range(3):  # three epochs
            assert [ds[i][1] for i in range(3)] == [0, 0, 0]
    said = [r.getMessage() for r in caplog.records if "skipping unreadable" in r.getMessage()]
    assert len(said) == 2 and {s.split()[4] for s in said} == set(paths[1:]), said
