"""data/images.py: finding unreadable images, with progress on long reads."""

from __future__ import annotations

from PIL import Image

from cwps_lightning.data.images import find_unreadable


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
