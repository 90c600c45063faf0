"""Crash-safe progress: the run's store doubles as its progress record.

After every finished task (every visit in joint mode) the CWPS bank is saved as the store under
``<run dir>/store`` and the manifest records what is done (see cwps/store.py for why a kill at any
moment leaves a whole store). Rerunning the same command with the same run directory
(``hydra.run.dir=<dir>``) restores T0, the bank, the metrics and the finished steps, and goes on
at the first unfinished step. A store from another config is refused, never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from . import distributed
from .cwps import MultiTaskStore, StoreError, save_store
from .cwps.store import MANIFEST, unfinished_first_save
from .errors import ConfigError, as_typed
from .methods.base import Method
from .runner import T0, MethodResult, Runner
from .settings import ADDED_KEYS_AT_OLD_VALUE

log = logging.getLogger(__name__)

#: config sections that do not change what a run computes (where it writes, how it logs)
NON_RESULT_KEYS = ("paths", "hydra", "logger")
NON_RESULT_TRAINER_KEYS = ("enable_progress_bar", "enable_model_summary", "log_every_n_steps")


def result_config(cfg: DictConfig) -> dict:
    """The part of the config that decides the results (what a resumed run must share)."""
    plain = OmegaConf.to_container(cfg, resolve=False)
    for key in NON_RESULT_KEYS:
        plain.pop(key, None)
    for key in NON_RESULT_TRAINER_KEYS:
        plain.get("trainer", {}).pop(key, None)
    for (section, key), old in ADDED_KEYS_AT_OLD_VALUE.items():
        if plain.get(section, {}).get(key, old) == old:
            plain.get(section, {}).pop(key, None)
    return plain


def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def _flatten(d, prefix=""):
    out = {}
    for k, v in (d or {}).items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def check_same_config(store_dir: Path, manifest: dict, config: dict, digest: str) -> None:
    """Refuse a store that a config other than ``config`` (hashed: ``digest``) wrote."""
    run = manifest.get("run")
    if not isinstance(run, dict):  # (save_store's own stores keep no run record)
        raise ConfigError(f"{store_dir / MANIFEST} has no record of a training run (a store "
                          "written outside the train command?); use a new run dir")
    if run.get("config_hash") != digest:
        raise ConfigError(
            f"{store_dir / MANIFEST} was written by a different config "
            f"({config_difference(run.get('config'), config)}); rerun with the same overrides, "
            f"or use a new run dir"
        )


def config_difference(stored: dict | None, config: dict, limit: int = 5) -> str:
    """The settings two result configs differ in, each with its value in both, for a reader:
    a section whose class (``_target_``: another benchmark, say) differs is named by that
    alone, since its other keys come with it; Hydra's ``_convert_`` is left out."""
    old, new = _flatten(stored), _flatten(config)

    def hashed(d: dict, k: str) -> str:  # (as config_hash sees it: 1 and 1.0 differ there)
        return json.dumps(d[k], sort_keys=True, default=str) if k in d else "\0unset"

    diff = sorted(k for k in set(old) | set(new) if hashed(old, k) != hashed(new, k))
    swapped = {k[:-len("._target_")] for k in diff if k.endswith("._target_")}
    shown = sorted((k for k in diff if not k.endswith("._convert_") and (
        k.endswith("._target_") or not any(k.startswith(f"{s}.") for s in swapped))),
        key=lambda k: not k.endswith("._target_"))  # (a class first: it says the most)

    def value(d: dict, k: str) -> str:
        text = as_typed(d[k]) if k in d else "unset"
        return text if len(text) <= 60 else text[:57] + "..."

    if not shown:  # (a change _flatten cannot show: an empty section there, absent now)
        return "the config's hashes differ"
    said = [f"{k}: {value(old, k)} there, {value(new, k)} now" for k in shown[:limit]]
    more = f"; and {len(shown) - limit} more" if len(shown) > limit else ""
    return f"{len(shown)} setting(s) differ: {'; '.join(said)}{more}"


def check_run_dir_reuse(run_dir: str | Path, cfg: DictConfig, required: bool = False) -> None:
    """Refuse, from the manifest alone (nothing else is read), a run dir whose store a
    different config wrote: the train command's check, before Hydra rewrites the run dir's
    .hydra/ files (which would then record this config next to the other's results).
    ``required``: a run dir without a readable run record is refused too (a kept run whose
    results would be read as this config's: seed_sweep --reuse); the train command starts
    such a one afresh."""
    store_dir = Path(run_dir) / "store"
    try:
        manifest = json.loads((store_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None  # none, or unreadable: the run's own load says what is wrong with it
    run = manifest.get("run") if isinstance(manifest, dict) else None
    if isinstance(run, dict) and isinstance(run.get("config"), dict | None):
        config = result_config(cfg)
        check_same_config(store_dir, manifest, config, config_hash(config))
    elif required:
        raise ConfigError(f"{store_dir / MANIFEST} is missing, unreadable or holds no run "
                          "record, so the kept run's settings cannot be checked; move the run "
                          "away to run it again")
    # (anything else is not a manifest this code wrote: the run's own load names it)


class RunRecorder:
    def __init__(self, run_dir: str | Path, cfg: DictConfig, backbone: dict, cwps_meta: dict):
        self.store_dir = Path(run_dir) / "store"
        self.config = result_config(cfg)
        self.hash = config_hash(self.config)
        self.full_config = OmegaConf.to_container(cfg, resolve=True)
        self.backbone = backbone
        self.cwps_meta = cwps_meta
        #: what the run's first attempt said of T0 (pretrained or cached, its val top-1): kept
        #: in the manifest, so a resumed run reports it too
        self.t0_info: dict = {}
        #: the ranks record of the attempts before this one (ranks_over_attempts)
        self.earlier_ranks: dict | None = None
        #: torch's intra-op thread count the stored tasks trained under (the first attempt's;
        #: None: a store written before it was kept, whose count is unknown)
        self.stored_threads: int | None = None
        #: whether an earlier attempt stored tasks (existing found a store)
        self.resumed = False
        #: this rank's evaluation device (the job sets it): the thread count matters on the CPU
        self.device = None
        self._threads_said = False

    # -- restore -------------------------------------------------------------------------------
    def existing(self) -> MultiTaskStore | None:
        """The store of an earlier attempt at this run, checked against this config."""
        if self.store_dir.exists() and not self.store_dir.is_dir():
            raise StoreError(f"{self.store_dir}: a file where the run keeps its store (a "
                             "folder); move it away")
        if not (self.store_dir / MANIFEST).exists():
            unfinished = unfinished_first_save(self.store_dir)
            if unfinished:  # (the first save's manifest is its last write: nothing was stored)
                if distributed.rank() == 0:  # (every rank reads the folder; one says it)
                    log.warning("%s: an earlier attempt stopped while writing the store's "
                                "first version (%s, no %s): starting afresh", self.store_dir,
                                ", ".join(unfinished), MANIFEST)
                return None
            if self.store_dir.exists() and any(self.store_dir.iterdir()):
                raise StoreError(
                    f"{self.store_dir}: files but no {MANIFEST}; not a store this code wrote "
                    "(move it away to start afresh)"
                )
            return None
        store = MultiTaskStore.load(self.store_dir)
        check_same_config(self.store_dir, store.manifest, self.config, self.hash)
        run = store.manifest["run"]
        self.t0_info = dict(run.get("t0") or {})
        self.earlier_ranks = run.get("ranks")
        self.stored_threads = run.get("cpu_threads")
        self.resumed = True
        return store

    def _warn_other_thread_count(self) -> None:
        """On the CPU the intra-op thread count orders the float sums: a run resumed under
        another count than its stored tasks trained under went on with other rounding (its
        results then match neither count's uninterrupted run). Said once, at this attempt's
        first stored task: its fits ran under the count they use (Lightning's launcher sets it
        at the first fit, where OMP_NUM_THREADS is unset), and a rerun that trains nothing says
        nothing. Rank 0 saves, so rank 0 says it; the run goes on."""
        now = torch.get_num_threads()
        if self._threads_said or self.stored_threads is None or self.stored_threads == now or \
                self.device is None or torch.device(self.device).type != "cpu":
            return
        self._threads_said = True
        log.warning("%s: the tasks stored before trained with %d CPU thread(s), this attempt's "
                    "with %d: on the CPU the count orders the float sums, so the results will "
                    "not be the numbers of an uninterrupted run; resume with "
                    "OMP_NUM_THREADS=%d for those", self.store_dir, self.stored_threads, now,
                    self.stored_threads)

    def ranks_over_attempts(self) -> dict:
        """results.json's ``ranks`` over every attempt at this run: the fits whose weights
        were compared across ranks, summed, and the world size of this attempt, or of the
        attempts before where this one fitted nothing (a rerun of a finished run makes no
        process group)."""
        now = distributed.ranks_report()
        before = self.earlier_ranks
        if not before:
            return now
        return {"world_size": now["world_size"] if now["fits_checked_equal"]
                else before.get("world_size", 1),
                "fits_checked_equal": before.get("fits_checked_equal", 0)
                + now["fits_checked_equal"]}

    def restore(self, store: MultiTaskStore, runner: Runner,
                methods: list[Method]) -> dict[str, MethodResult]:
        """The results of ``methods`` an earlier attempt recorded. The store holds the bank of
        the method that shares between tasks (CWPS); the others' banks are T0 only."""
        run = store.manifest["run"]
        records = run.get("methods", {})
        if not isinstance(records, dict) or not all(isinstance(r, dict)
                                                    for r in records.values()):
            raise StoreError(f"{self.store_dir / MANIFEST}: corrupt manifest ('run.methods' of "
                             "another type: each method's progress record)")
        restored = {}
        for method in methods:
            record = records.get(method.name)
            if record is None:
                continue
            result = runner.new_result(method, **record)
            if method.shares_tasks:
                lost = [t for t in result.tasks if t not in store.tasks]
                if lost:  # (resumed, the run stored itself again without them)
                    raise StoreError(f"{self.store_dir}: {method.name}'s record has task(s) "
                                     f"{lost} done that the store does not hold (it holds "
                                     f"{store.tasks}): an edited or damaged manifest; move the "
                                     "store away to run afresh")
                result.bank = store.to_bank()
            restored[method.name] = result
        log.info("resuming %s: visits done %s", self.store_dir,
                 {name: len(r.done) for name, r in restored.items()})
        return restored

    @staticmethod
    def t0_from(store: MultiTaskStore):
        return store.model(T0).train()

    # -- save ----------------------------------------------------------------------------------
    def save(self, methods: dict[str, MethodResult], complete: bool = False) -> None:
        """The store (CWPS's bank) with every method's progress record in its manifest."""
        if not complete:  # (a task this attempt trained: the run's last save stores none)
            self._warn_other_thread_count()
        cwps = methods["cwps"]
        meta = {
            "backbone": self.backbone,
            **self.cwps_meta,
            "metrics": {t: {"top1": m["top1"], "val_top1": m["val_top1"]}
                        for t, m in cwps.tasks.items()},
            "run": {
                "config_hash": self.hash,
                "config": self.config,
                "complete": complete,
                "methods": {name: m.record() for name, m in methods.items()},
                "t0": self.t0_info,
                "ranks": self.ranks_over_attempts(),
                # (the first attempt's; unknown for a store written before it was kept)
                "cpu_threads": self.stored_threads if self.resumed else torch.get_num_threads(),
            },
            "config": self.full_config,
        }
        save_store(self.store_dir, cwps.bank, meta)
