"""``python -m cwps_lightning.data check``: each planted defect is found and located."""

from __future__ import annotations

import io
import os

from cwps_lightning.data.__main__ import main
from cwps_lightning.data.check import Report

from .helpers import (
    REPO,
    make_domainnet,
    make_folder_task,
    run_cli,
    write_corrupt,
    write_image,
    write_truncated,
)


def check(capsys, *overrides, strict=False):
    argv = ["check", *(["--strict"] if strict else []), *overrides]
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def lines(out: str, level: str, kind: str) -> list[str]:
    return [ln for ln in out.splitlines()
            if ln.startswith(level) and f"[{kind}]" in ln and "more like the above" not in ln]


def test_clean_domainnet_passes(capsys, dn_root):
    code, out, _ = check(capsys, "+experiment=domainnet", f"data.root={dn_root}")
    assert code == 0, out
    assert "data check: OK, no errors" in out
    assert "decoded 108 image(s)" in out  # 6 domains x 3 classes x (4 + 2)
    assert lines(out, "WARN", "count")  # tiny tree vs the official counts
    code, out, _ = check(capsys, "+experiment=domainnet", f"data.root={dn_root}", strict=True)
    assert code == 1 and "FAILED (--strict)" in out


def test_domainnet_planted_defects(capsys, dn_root):
    (dn_root / "clipart" / "apple" / "clipart_apple_train2.jpg").unlink()  # missing file
    write_corrupt(dn_root / "real" / "cat" / "real_cat_test1.jpg")  # corrupt image
    write_truncated(dn_root / "sketch" / "bee" / "sketch_bee_train0.jpg")  # truncated image
    for p in (dn_root / "painting" / "bee").iterdir():  # missing class
        p.unlink()
    (dn_root / "painting" / "bee").rmdir()
    code, out, _ = check(capsys, "+experiment=domainnet", f"data.root={dn_root}")
    assert code == 1
    missing = lines(out, "ERROR", "missing-file")
    assert missing == ["ERROR [missing-file] clipart: clipart_train.txt:3: "
                       "clipart/apple/clipart_apple_train2.jpg does not exist"]
    corrupt = lines(out, "ERROR", "corrupt-image")
    assert len(corrupt) == 2
    assert any(str(dn_root / "real/cat/real_cat_test1.jpg") in ln for ln in corrupt)
    assert any(str(dn_root / "sketch/bee/sketch_bee_train0.jpg") in ln for ln in corrupt)
    cls = lines(out, "ERROR", "missing-class")
    assert len(cls) == 1 and "painting" in cls[0] and "bee (label 1)" in cls[0]
    assert "6 image(s)" in cls[0]  # its listed images are reported once, with the class
    summary = out.strip().splitlines()[-1]
    assert summary.startswith("data check: FAILED, 4 error(s)")
    assert "corrupt-image: 2" in summary and "missing-class: 1" in summary


def test_domainnet_split_file_problems(capsys, dn_root):
    with open(dn_root / "quickdraw_test.txt", "a") as f:
        f.write("quickdraw/apple/quickdraw_apple_test0.jpg\n")  # no label
        f.write("quickdraw/apple/quickdraw_apple_test1.jpg 999\n")  # outside the head
    (dn_root / "infograph_train.txt").unlink()
    code, out, _ = check(capsys, "+experiment=domainnet", f"data.root={dn_root}")
    assert code == 1
    assert any("quickdraw_test.txt:7: expected" in ln for ln in lines(out, "ERROR", "split-file"))
    assert any("quickdraw_test.txt:8: label 999" in ln for ln in lines(out, "ERROR", "label"))
    assert any("infograph_train.txt" in ln for ln in lines(out, "ERROR", "layout"))


def test_domainnet_class_absent_from_a_split_is_a_warning(capsys, tmp_path):
    root = make_domainnet(tmp_path / "dn", domains=("clipart", "sketch"),
                          drop={("clipart", "test"): {"bee"}})
    code, out, _ = check(capsys, "+experiment=domainnet", f"data.root={root}",
                         "data.tasks=[clipart,sketch]")
    assert code == 0, out
    warn = lines(out, "WARN", "class-not-in-split")
    assert len(warn) == 1 and "clipart_test.txt" in warn[0] and "bee (1)" in warn[0]


def test_imagenet_sketch_planted_defects(capsys, i2s_root):
    write_corrupt(i2s_root / "flowers" / "train" / "bee" / "bad.jpg")  # corrupt image
    for p in (i2s_root / "wikiart" / "train" / "cat").iterdir():  # missing class (in train)
        p.unlink()
    (i2s_root / "wikiart" / "train" / "cat").rmdir()
    os.symlink(i2s_root / "gone.jpg", i2s_root / "sketches" / "test" / "apple" / "link.jpg")
    code, out, _ = check(capsys, "+experiment=imagenet_sketch", f"data.root={i2s_root}")
    assert code == 1
    assert len(lines(out, "ERROR", "corrupt-image")) == 1
    assert str(i2s_root / "flowers/train/bee/bad.jpg") in lines(out, "ERROR", "corrupt-image")[0]
    cls = lines(out, "ERROR", "missing-class")
    assert len(cls) == 1 and "wikiart" in cls[0] and "'cat'" in cls[0]
    missing = lines(out, "ERROR", "missing-file")
    assert len(missing) == 1 and "link.jpg" in missing[0]
    # counts against the reference dataset (Piggyback): a warning for each task and count
    assert any("cubs_cropped: 3 classes, the reference dataset has 200" in ln
               for ln in lines(out, "WARN", "count"))


def test_domainnet_missing_domain_folder_says_its_images_are_not_on_disk(capsys, dn_root):
    """(the INFO line read 'train 12 images, test 6 images' of a domain with no folder)"""
    for p in sorted((dn_root / "clipart").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (dn_root / "clipart").rmdir()
    code, out, _ = check(capsys, "+experiment=domainnet", f"data.root={dn_root}",
                         "data.tasks=[clipart,real]")
    assert code == 1 and any("missing domain folder" in ln for ln in lines(out, "ERROR", "layout"))
    info = {ln.split(":")[0]: ln for ln in out.splitlines() if ln.startswith("INFO  ")}
    assert info["INFO  clipart"].endswith(f"in train, none on disk ({dn_root / 'clipart'} is "
                                          "missing)")
    assert info["INFO  real"].endswith("in train")


def test_imagenet_sketch_missing_task_and_wrong_layout(capsys, i2s_root, dn_root):
    for p in sorted((i2s_root / "cubs_cropped").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (i2s_root / "cubs_cropped").rmdir()
    code, out, _ = check(capsys, "+experiment=imagenet_sketch", f"data.root={i2s_root}")
    assert code == 1
    assert any("cubs_cropped" in ln for ln in lines(out, "ERROR", "layout"))
    code, out, _ = check(capsys, "+experiment=imagenet_sketch", f"data.root={dn_root}")
    layout = lines(out, "ERROR", "layout")
    assert code == 1 and len(layout) == 1
    assert "ImageNet-to-Sketch layout" in layout[0] and "clipart/" in layout[0]


def test_folders_check(capsys, tmp_path):
    make_folder_task(tmp_path / "t1", classes=("a", "b"))
    make_folder_task(tmp_path / "t2", classes=("a", "b"))
    write_image(tmp_path / "t2" / "test" / "c" / "only_in_test.jpg")
    (tmp_path / "t1" / "train" / "notes.txt").write_text("hello")
    code, out, _ = check(capsys, "data=folders", f"data.root={tmp_path}")
    assert code == 1
    cls = lines(out, "ERROR", "missing-class")
    assert len(cls) == 1 and "t2" in cls[0] and "'c'" in cls[0]
    assert lines(out, "WARN", "ignored-files")


def test_folders_check_refuses_a_task_of_one_class(capsys, tmp_path):
    """What training refuses (the accuracy metrics need 2 classes), the check reports."""
    make_folder_task(tmp_path / "t1", classes=("a",))
    make_folder_task(tmp_path / "t2", classes=("a", "b"))
    code, out, _ = check(capsys, "data=folders", f"data.root={tmp_path}")
    assert code == 1
    assert lines(out, "ERROR", "classes") == [
        f"ERROR [classes] t1: {tmp_path / 't1' / 'train'} has a single class folder, 'a'; a "
        f"task needs 2 or more classes"]


def folders_override(tmp_path, **extra) -> str:
    entry = {"name": "t", "train": f"{tmp_path}/t/train", "test": f"{tmp_path}/t/test", **extra}
    return "data.folders=[{" + ", ".join(f"{k}: '{v}'" if isinstance(v, str) else f"{k}: {v}"
                                         for k, v in entry.items()) + "}]"


def test_folders_check_applies_the_entry_checks_of_training(capsys, tmp_path):
    """data check refuses each data.folders entry the train command refuses: a bad setting
    with one line (exit 2), a class count or val folder that the trees contradict with an
    ERROR line (exit 1). It used to pass them all ("OK")."""
    make_folder_task(tmp_path / "t", classes=("a", "b"))
    settings = [({"transform": "zoom"}, "data.folders[0].transform must be one of"),
                ({"val_fraction": 2}, "data.folders[0].val_fraction must be a number in (0, 1)"),
                ({"train": "null"}, "data.folders[0].train must be a path"),
                ({"test": f"{tmp_path}/t/train"},
                 "data.folders[0]: train and test are the same folder")]
    for extra, needle in settings:
        override = folders_override(tmp_path, **extra).replace("'null'", "null")
        code, out, err = check(capsys, "data=folders", override)
        assert code == 2 and err.startswith(f"error: {needle}") and err.count("\n") == 1, err
        assert not out  # refused before any folder is read
    trees = [({"num_classes": 5}, "classes",
              f"t: num_classes=5 disagrees with the 2 class folders of {tmp_path}/t/train"),
             ({"val": f"{tmp_path}/nope"}, "layout", f"t: {tmp_path}/nope does not exist")]
    for extra, kind, needle in trees:
        code, out, _ = check(capsys, "data=folders", folders_override(tmp_path, **extra))
        found = lines(out, "ERROR", kind)
        assert code == 1 and len(found) == 1 and needle in found[0], out


def test_folders_check_reads_the_val_folder(capsys, tmp_path):
    make_folder_task(tmp_path / "t", classes=("a", "b"))
    write_image(tmp_path / "t" / "val" / "a" / "v.jpg")
    write_image(tmp_path / "t" / "val" / "zebra" / "z.jpg")  # a class train does not have
    write_corrupt(tmp_path / "t" / "val" / "a" / "bad.jpg")
    code, out, _ = check(capsys, "data=folders",
                         folders_override(tmp_path, val=f"{tmp_path}/t/val"))
    assert code == 1
    cls = lines(out, "ERROR", "missing-class")
    assert len(cls) == 1 and "'zebra'" in cls[0] and f"{tmp_path}/t/val" in cls[0]
    assert "bad.jpg" in lines(out, "ERROR", "corrupt-image")[0]
    assert "t: 2 classes, train 8 images, test 4 images, val 3 images" in out


def test_report_limits_lines_per_kind(capsys, tmp_path):
    root = make_domainnet(tmp_path / "dn", domains=("clipart",), n_train=30)
    for i in range(25):
        write_corrupt(root / "clipart" / "apple" / f"clipart_apple_train{i}.jpg")
    code, out, _ = check(capsys, "+experiment=domainnet", f"data.root={root}",
                         "data.tasks=[clipart]")
    assert code == 1
    assert len(lines(out, "ERROR", "corrupt-image")) == 20
    assert "... and 5 more like the above" in out
    assert "corrupt-image: 25" in out.strip().splitlines()[-1]


def test_config_errors_exit_2(capsys, tmp_path):
    code, _, err = check(capsys, "+experiment=domainnet", f"data.root={tmp_path / 'none'}")
    assert code == 2 and err.startswith("error: data.root=") and "does not exist" in err
    assert err.count("\n") == 1  # one line
    code, _, err = check(capsys, "+experiment=no_such_preset")
    assert code == 2 and "no_such_preset" in err
    code, _, err = check(capsys)  # the default (digits) benchmark lives in memory
    assert code == 2 and "nothing to check" in err
    code, _, err = check(capsys, "+experiment=domainnet", f"data.root={tmp_path}",
                         "data.tasks=[mars]")
    assert code == 2 and "unknown task" in err


def test_check_cli_subprocess(tmp_path):
    root = make_domainnet(tmp_path / "dn", domains=("clipart", "real"))
    write_corrupt(root / "real" / "apple" / "real_apple_test0.jpg")
    proc = run_cli("cwps_lightning.data", ["check", "+experiment=domainnet", f"data.root={root}",
                                           "data.tasks=[clipart,real]"], cwd=REPO, timeout=300)
    assert proc.returncode == 1, proc.stderr
    assert "ERROR [corrupt-image]" in proc.stdout and "real_apple_test0.jpg" in proc.stdout
    assert proc.stdout.strip().splitlines()[-1].startswith("data check: FAILED, 1 error(s)")


def test_decode_uses_full_decoding(capsys, tmp_path):
    n = 3
    root = make_domainnet(tmp_path / "dn", domains=("clipart",))
    for i in range(n):
        write_truncated(root / "clipart" / "cat" / f"clipart_cat_train{i}.jpg")
    code, out, _ = check(capsys, "+experiment=domainnet", f"data.root={root}",
                         "data.tasks=[clipart]")
    assert code == 1 and len(lines(out, "ERROR", "corrupt-image")) == n


def test_imagenet_sketch_class_missing_from_test_or_empty_in_train(capsys, i2s_root):
    for p in (i2s_root / "flowers" / "test" / "cat").iterdir():
        p.unlink()
    (i2s_root / "flowers" / "test" / "cat").rmdir()
    for p in (i2s_root / "wikiart" / "train" / "bee").iterdir():  # the folder stays, empty
        p.unlink()
    code, out, _ = check(capsys, "+experiment=imagenet_sketch", f"data.root={i2s_root}")
    assert code == 1
    cls = lines(out, "ERROR", "missing-class")
    assert len(cls) == 2, out
    assert any("flowers" in ln and "'cat'" in ln for ln in cls)
    assert any("wikiart" in ln and "'bee'" in ln for ln in cls)


def test_domainnet_lines_listed_twice_in_another_domain_or_outside_the_head(capsys, tmp_path):
    root = make_domainnet(tmp_path / "dn", domains=("clipart", "sketch"))
    with open(root / "clipart_train.txt", "a") as f:
        f.write("clipart/apple/clipart_apple_train0.jpg 0\n")  # line 13
        f.write("sketch/apple/sketch_apple_train0.jpg 0\n")  # line 14
    with open(root / "sketch_test.txt", "a") as f:
        f.write("sketch/cat/sketch_cat_test0.jpg 3\n")  # line 7
    code, out, _ = check(capsys, "+experiment=domainnet", f"data.root={root}",
                         "data.tasks=[clipart,sketch]", "data.num_classes=3")
    assert code == 1
    assert any("clipart_train.txt:13:" in ln and "listed twice" in ln
               for ln in lines(out, "WARN", "duplicate")), out
    assert any("clipart_train.txt:14:" in ln and "is not under clipart/" in ln
               for ln in lines(out, "WARN", "layout")), out
    assert any("sketch_test.txt:7: label 3 is outside [0, 3)" in ln
               for ln in lines(out, "ERROR", "label")), out


def test_report_limits_lines_for_each_task_separately():
    out = io.StringIO()
    report = Report(stream=out, limit=2)
    for task in ("clipart", "sketch"):
        for i in range(3):
            report.error("missing-file", f"{task}/{i}.jpg does not exist", task=task)
    assert report.finish() == 1
    text = out.getvalue()
    for task in ("clipart", "sketch"):
        assert len(lines(text, f"ERROR [missing-file] {task}:", "missing-file")) == 2
        assert f"ERROR [missing-file] ({task}) ... and 1 more like the above" in text
    assert "missing-file: 6" in text.strip().splitlines()[-1]


def test_an_image_listed_twice_is_decoded_and_reported_once(tmp_path):
    """(two data.folders tasks may share a test folder)"""
    bad, good = write_corrupt(tmp_path / "bad.jpg"), write_image(tmp_path / "good.jpg")
    out = io.StringIO()
    report = Report(stream=out)
    report.decode_all([str(bad), str(good), str(bad), str(good)])
    assert len(lines(out.getvalue(), "ERROR", "corrupt-image")) == 1
    assert "decoded 2 image(s)" in out.getvalue()


def test_check_refuses_the_settings_training_refuses(capsys, tmp_path):
    root = make_domainnet(tmp_path / "dn", domains=("clipart",), n_train=1, n_test=1)
    for setting, needle in (("data.transform=zoom", "data.transform must be auto or one of"),
                            ("data.val_fraction=2", "data.val_fraction must be"),
                            ("data.verify_images=some", "data.verify_images must be one of"),
                            ("data.transform=resize data.resize_size=300",
                             "data.resize_size=300 is not used")):
        code, out, err = check(capsys, "+experiment=domainnet", f"data.root={root}",
                               "data.tasks=[clipart]", *setting.split())
        assert code == 2 and err.startswith(f"error: {needle}") and not out, (setting, out, err)


def test_folders_check_says_which_root_it_reads(capsys, tmp_path):
    for task in ("t1", "t2"):
        make_folder_task(tmp_path / task, classes=("a", "b"), n_train=2, n_test=1)
    _, out, _ = check(capsys, "data=folders", f"data.root={tmp_path}")
    assert out.splitlines()[0] == f"checking folders at {tmp_path}: tasks ['t1', 't2']"
    _, out, _ = check(capsys, "data=folders", f"data.root={tmp_path}",
                      "data.folders=[{name: t, train: t1/train, test: t1/test}]")
    assert out.splitlines()[0] == f"checking folders at {tmp_path}: tasks ['t']"


def test_a_conflicting_line_is_named_once_though_its_label_left_the_class_table(capsys,
                                                                                tmp_path):
    """Label 3's one line names class 'apple', label 0's by majority: label 3 has no class of
    its own, so with data.num_classes=null the head ends at label 2. The line is named once, as
    the conflict (it was also reported as outside [0, 3))."""
    root = make_domainnet(tmp_path / "dn", domains=("clipart",))
    write_image(root / "clipart" / "apple" / "extra.jpg")
    with open(root / "clipart_train.txt", "a") as f:
        f.write("clipart/apple/extra.jpg 3\n")  # line 13
    code, out, _ = check(capsys, "+experiment=domainnet", f"data.root={root}",
                         "data.tasks=[clipart]", "data.num_classes=null")
    assert code == 1
    named = [ln for ln in out.splitlines() if "clipart_train.txt:13" in ln]
    assert len(named) == 1 and "[label]" in named[0] and "class 'apple' has label 0" in named[0]


def test_domainnet_class_a_domain_lists_in_neither_split_is_a_warning_not_an_error(
        capsys, tmp_path):
    """Training and evaluation accept such a domain (its labels are unaffected); the check
    said ERROR [missing-class] for its absent folder and FAILED."""
    root = make_domainnet(tmp_path / "dn", domains=("clipart", "sketch"),
                          drop={("sketch", "train"): {"bee"}, ("sketch", "test"): {"bee"}})
    assert not (root / "sketch" / "bee").exists()
    code, out, _ = check(capsys, "+experiment=domainnet", f"data.root={root}",
                         "data.tasks=[clipart,sketch]")
    assert code == 0, out
    assert not lines(out, "ERROR", "missing-class")
    warn = lines(out, "WARN", "class-not-in-split")
    assert len(warn) == 2 and all("bee (1)" in w for w in warn)


def test_a_split_file_with_a_byte_order_mark_is_read_as_without(capsys, tmp_path):
    """A BOM (an editor's UTF-8 signature) became part of the first line's path: the check
    warned of a file outside its domain, and training refused the 'missing' image."""
    from cwps_lightning.data.domainnet import parse_split_file

    root = make_domainnet(tmp_path / "dn", domains=("clipart",))
    split = root / "clipart_train.txt"
    text = split.read_text()
    split.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    entries, bad = parse_split_file(split)
    assert not bad and entries[0].rel == text.split()[0]
    code, out, _ = check(capsys, "+experiment=domainnet", f"data.root={root}",
                         "data.tasks=[clipart]")
    assert code == 0 and not lines(out, "WARN", "layout"), out
