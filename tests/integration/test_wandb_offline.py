"""logger=wandb offline through the real CLI: one W&B run per fit plus a summary run, one group,
and what they hold, read back from the offline run files (wandb_log.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from .helpers import REPO, cli_env, train_cmd

BLOCK = 32768  # W&B's run file: LevelDB-style log blocks of protobuf Records


def wandb_records(path: Path):
    """The Records of an offline ``run-<id>.wandb`` file (header ':W&B' + 3 bytes, then
    chunks: crc (4), length (2, little-endian), type (1: full, 2: first, 3: middle, 4: last))."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 2):
            buf = chunk
        elif kind in (3, 4):
            buf += chunk
        else:
            continue
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def read_run(path: Path) -> dict:
    run, history, artifacts = None, [], []
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
        elif kind == "artifact":
            artifacts.append(r.artifact.type)
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in r.history.item})
    return {"name": run.display_name, "group": run.run_group, "job_type": run.job_type,
            "history": history, "artifacts": artifacts}


def test_one_run_per_fit_one_group_and_a_summary_run(tmp_path, t0_cache):
    run_dir = tmp_path / "run"
    env = {**cli_env(), "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path),
           "WANDB_CACHE_DIR": str(tmp_path / "cache"), "WANDB_CONFIG_DIR": str(tmp_path)}
    cmd = train_cmd(run_dir, "logger=wandb", "logger.mode=offline", "data.tasks=[optdigits]",
                    "cwps.baselines=[frozen]", "logger.log_store=true", cache=t0_cache)
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "already in progress" not in proc.stdout + proc.stderr
    assert "anonymous setting" not in proc.stdout + proc.stderr  # wandb's warning, each run
    runs = [read_run(p) for p in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))]
    names = sorted(r["name"] for r in runs)
    # T0 may come from the shared cache (no fit) or be pretrained here (one fit)
    fits = ["cwps/optdigits-it0-mask", "cwps/optdigits-it0-warmup", "frozen/optdigits"]
    assert names in (sorted([*fits, "summary"]), sorted([*fits, "summary", "t0/mnist"]))
    assert {r["group"] for r in runs} == {f"{run_dir.parent.name}/{run_dir.name}"}
    for r in runs:
        if r["name"] == "summary":
            continue
        assert r["job_type"] == r["name"].split("/")[0]
        logged = set().union(*r["history"])
        assert "train/loss_epoch" in logged, r["name"]
        if r["name"].endswith("-mask"):
            assert "sharing/specific_channels" in logged
    summary = next(r for r in runs if r["name"] == "summary")
    assert "cwps-store" in summary["artifacts"]  # logger.log_store=true
    logged = summary["history"][0]
    results = json.loads((run_dir / "results.json").read_text())
    assert logged["results/_type"] == "table-file" and logged["results/nrows"] == 2
    for figure in results["figures"]:
        assert logged[f"figures/{Path(figure).stem}/_type"] == "image-file"
    table_file = next(run_dir.glob("wandb/offline-run-*/files/" + logged["results/path"]))
    table = json.loads(table_file.read_text())
    rows = {row[0]: row for row in table["data"]}
    assert rows["CWPS"][1] == results["methods"]["cwps"]["param_ratio"]
    assert rows["CWPS"][-1] == results["methods"]["cwps"]["mean_top1"]
