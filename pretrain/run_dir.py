"""A training run's directory: claimed once, checkpointed atomically, resumed from its newest complete checkpoint.

Every training command (``textgym pretrain | reward | sft | dpo | train ...``) writes its run into
one directory through :class:`RunDir`::

    runs/ppo/
        run.json                 which command owns the dir (and its config)
        metrics.jsonl, events.*  the metric stream (TensorBoard)
        checkpoint-20/           complete checkpoints, the newest ``keep`` of them
        checkpoint-30/             (model + training state + manifest.json)
        final/                   the finished model (written the same atomic way)

**Atomic checkpoints** (the protocol of Hugging Face's Trainer, with a verifiable marker): a
checkpoint is written into ``.tmp-checkpoint-<step>/``; every file is fsynced; ``manifest.json``,
holding the sha256 of every file, is written last; the directory is renamed to
``checkpoint-<step>`` (an atomic rename) and the parent fsynced; only then are older checkpoints
deleted. A kill at any moment leaves the previous complete checkpoint intact, and at most a
``.tmp-*`` directory that the next run deletes. Resuming picks the newest checkpoint whose manifest
verifies; a checkpoint that does not verify is skipped with a :class:`CheckpointWarning` naming it
and the one used instead.

**Runs never write into each other**: a new run refuses a non-empty directory (another run, or
anything else, e.g. a user's model) unless told to overwrite; ``resume`` continues in its own
directory and refuses a directory that holds another command's run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import threading
import warnings
from collections.abc import Callable
from pathlib import Path

RUN_FILE = "run.json"
STATE = "training_state.json"  # what pretrain.checkpoint writes into a checkpoint: counters, RNG states, the config
MANIFEST = "manifest.json"
CHECKPOINT_PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-"
FINAL = "final"
# What a previous run leaves in its dir; ``overwrite`` removes exactly these before a new run starts.
RUN_ARTIFACTS = (RUN_FILE, "metrics.jsonl", FINAL, "hparams", "init-model", "summary.json", "progress.csv",
                 "train_pairs.jsonl", "eval_pairs.jsonl", "eval.json", "eval.png", "sb3_model.zip")


# Settings a resumed run may change; the rest must equal the checkpoint's (a resumed run is the same run).
MAY_CHANGE_ON_RESUME = ("resume", "out", "overwrite", "device", "total_steps", "checkpoint_every", "sample_every",
                        "keep_checkpoints", "threads", "eval_prompts")


def check_same_config(mine: dict, saved: dict, where: Path) -> None:
    """Raise ``ValueError`` listing every setting outside ``MAY_CHANGE_ON_RESUME`` that differs from the checkpoint's."""
    differences = [f"{k}: checkpoint {saved[k]!r}, this run {mine[k]!r}" for k in mine
                   if k in saved and k not in MAY_CHANGE_ON_RESUME and mine[k] != saved[k]]
    if differences:
        raise ValueError(f"--resume: this run's settings differ from the checkpoint {where} ({'; '.join(differences)}); "
                         "resume with the checkpoint's settings (textgym reads them from the run when only --resume is given)")


class CheckpointWarning(UserWarning):
    """A checkpoint was skipped because it is incomplete or does not match its manifest."""


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's contents to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(directory: Path, step: int | None = None, extra: dict | None = None) -> dict:
    """fsync every file under ``directory``, then write ``manifest.json`` (sha256 of each file) last."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        fsync_path(path)
        files[path.relative_to(directory).as_posix()] = sha256_file(path)
    manifest = {"step": step, "files": files, **(extra or {})}
    if "model.safetensors" in files:  # what pretrain.model.verify_manifest also reads
        manifest["sha256"] = files["model.safetensors"]
    target = directory / MANIFEST
    target.write_text(json.dumps(manifest, indent=1))
    fsync_path(target)
    for sub in sorted({p.parent for p in directory.rglob("*")} | {directory}):
        fsync_path(sub)
    return manifest


def verify_dir(directory: Path) -> str | None:
    """None if ``directory`` holds a manifest whose every file exists with its sha256; else why not."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        return "it has no manifest.json (the write did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        return f"its manifest.json is unreadable ({type(err).__name__}: {err})"
    for name, digest in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if sha256_file(path) != digest:
            return f"{name} does not match its sha256 in manifest.json"
    return None


def atomic_write_dir(target: Path, write: Callable[[Path], None], step: int | None = None,
                     fault: Callable[[str, Path], None] | None = None) -> Path:
    """Write a directory all-or-nothing: ``write(tmp)``, manifest last, fsync, rename to ``target``.

    ``fault(stage, target)`` is a test hook called between the stages ("written", "manifest",
    "renamed"). An existing ``target`` is replaced only once the new one is complete.
    """
    fault = fault or (lambda stage, target: None)
    tmp = target.parent / f"{TMP_PREFIX}{target.name}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    fault("written", target)
    write_manifest(tmp, step)
    fault("manifest", target)
    if target.exists():  # the same name again: move the old one aside, never delete it first
        old = target.parent / f"{TMP_PREFIX}old-{target.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old)
    else:
        os.replace(tmp, target)
    fsync_path(target.parent)
    fault("renamed", target)
    return target


class RunDir:
    """The directory of one training run (see the module docstring).

    ``command`` names the run's kind ("train ppo", "dpo", ...): resuming a dir of another kind is
    refused. ``keep_checkpoints`` complete checkpoints are kept (>= 1). Raises ``FileExistsError``
    for a non-empty dir a new run may not write into, ``FileNotFoundError`` / ``ValueError`` for a
    dir that cannot be resumed.
    """

    def __init__(self, path: str | Path, command: str, *, resume: bool = False, overwrite: bool = False,
                 keep_checkpoints: int = 2, config: dict | None = None, claim: bool = True):
        """``claim=False``: open the dir without claiming it (the other processes of a data-parallel
        run, once the main process has claimed it; they read checkpoints and write nothing)."""
        if keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1, got {keep_checkpoints}")
        self.path, self.command, self.keep = Path(path), command, keep_checkpoints
        self.resumed = resume
        if resume:
            self._check_resumable()
        elif claim:
            self._claim(overwrite, config or {})

    # -- claiming a dir ------------------------------------------------------------------------------
    def _claim(self, overwrite: bool, config: dict) -> None:
        path = self.path
        if path.exists() and not path.is_dir():
            raise FileExistsError(f"{path} is a file; the run needs a directory (pick another --out)")
        existing = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
        if existing and not overwrite:
            owner = self.owner()
            if owner is not None:
                hint = f"continue it with --resume {path}, " if owner == self.command else ""
                raise FileExistsError(f"{path} already holds a {owner!r} run; {hint}pick another --out, or pass --overwrite to replace it")
            raise FileExistsError(
                f"{path} is not empty and holds no run of this library ({', '.join(existing[:5])}"
                f"{', ...' if len(existing) > 5 else ''}); pick another --out, or pass --overwrite to write into it"
            )
        if existing:  # overwrite: remove a previous run's artifacts, nothing else
            for p in path.iterdir():
                if p.name in RUN_ARTIFACTS or p.name.startswith((CHECKPOINT_PREFIX, TMP_PREFIX, "events.out.tfevents")):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
        path.mkdir(parents=True, exist_ok=True)
        (path / RUN_FILE).write_text(json.dumps({"command": self.command, "config": config}, indent=1, default=str))

    def owner(self) -> str | None:
        """The command whose run this dir holds (from run.json), or None."""
        try:
            return json.loads((self.path / RUN_FILE).read_text())["command"]
        except (OSError, json.JSONDecodeError, KeyError, TypeError):
            return None

    def _check_resumable(self) -> None:
        if not self.path.is_dir():
            raise FileNotFoundError(f"--resume {self.path}: the directory does not exist")
        owner = self.owner()
        if owner is None:
            raise FileNotFoundError(f"--resume {self.path}: it holds no run of this library (no readable {RUN_FILE})")
        if owner != self.command:
            raise ValueError(f"--resume {self.path}: it holds a {owner!r} run, not {self.command!r}")
        if self.latest_checkpoint() is None and self.final() is None:
            raise FileNotFoundError(f"--resume {self.path}: it holds no complete checkpoint to continue from")

    def saved_config(self, checkpoint: Path | None = None) -> dict:
        """The run's config: that of ``checkpoint`` (default: the newest complete one; a resume may
        have changed a setting such as total_steps), else the one it was started with (run.json)."""
        latest = checkpoint or self.latest_checkpoint()
        if latest is not None and (latest / STATE).is_file():
            return json.loads((latest / STATE).read_text())["state"]["config"]
        return json.loads((self.path / RUN_FILE).read_text()).get("config", {})

    # -- checkpoints ----------------------------------------------------------------------------------
    def checkpoint_dirs(self) -> list[tuple[int, Path]]:
        """``(step, dir)`` of every ``checkpoint-<step>`` dir, newest first (complete or not)."""
        return self.list_checkpoints(self.path)

    @staticmethod
    def list_checkpoints(path: str | Path) -> list[tuple[int, Path]]:
        """``(step, dir)`` of every ``checkpoint-<step>`` dir in ``path``, newest first (complete or not)."""
        found = []
        for p in Path(path).glob(f"{CHECKPOINT_PREFIX}*"):
            suffix = p.name[len(CHECKPOINT_PREFIX):]
            if p.is_dir() and suffix.isdigit():
                found.append((int(suffix), p))
        return sorted(found, reverse=True)

    def latest_checkpoint(self) -> Path | None:
        """The newest checkpoint that verifies against its manifest; a newer one that does not is
        skipped with a ``CheckpointWarning`` naming both."""
        skipped = []
        for _, path in self.checkpoint_dirs():
            problem = verify_dir(path)
            if problem is None:
                for bad, why in skipped:
                    warnings.warn(f"skipping checkpoint {bad}: {why}; using {path} instead", CheckpointWarning, stacklevel=2)
                return path
            skipped.append((path, problem))
        for bad, why in skipped:
            warnings.warn(f"skipping checkpoint {bad}: {why}; no earlier complete checkpoint", CheckpointWarning, stacklevel=2)
        return None

    def save_checkpoint(self, step: int, write: Callable[[Path], None]) -> Path:
        """Write ``checkpoint-<step>`` atomically (``write(dir)`` puts the files in), then prune old ones."""
        target = atomic_write_dir(self.path / f"{CHECKPOINT_PREFIX}{step}", write, step, self.fault)
        for _, old in self.checkpoint_dirs()[self.keep:]:
            shutil.rmtree(old)
        self.fault("pruned", target)
        for stale in self.path.glob(f"{TMP_PREFIX}*"):  # left by a run killed mid-write
            shutil.rmtree(stale, ignore_errors=True)
        return target

    def final(self) -> Path | None:
        """``final/`` if it was written completely."""
        path = self.path / FINAL
        return path if path.is_dir() and verify_dir(path) is None else None

    def save_final(self, write: Callable[[Path], None], step: int | None = None) -> Path:
        return atomic_write_dir(self.path / FINAL, write, step, self.fault)

    def fault(self, stage: str, target: Path) -> None:
        """Test hook: called between the stages of every atomic write of ``target`` (the kill tests raise here)."""


class StopOnInterrupt:
    """Turn the first Ctrl-C (SIGINT) into a flag the training loop checks between steps; a second
    Ctrl-C stops at once (``KeyboardInterrupt``)."""

    def __enter__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def resolve_out(cfg, default_name: str) -> Path:
    """A run's dir: ``cfg.out``, or ``cfg.resume`` when resuming, or ``runs/<default_name>``; a
    ``--out`` that differs from ``--resume`` is a ``ValueError`` (a resumed run stays in its own dir)."""
    resume, out = getattr(cfg, "resume", ""), cfg.out
    if resume and out and Path(out).resolve() != Path(resume).resolve():
        raise ValueError(
            f"--resume {resume} continues that run in its own dir, but --out is {out}: drop --out "
            f"(to branch off a copy, copy {resume} to {out} and resume the copy)"
        )
    return Path(out or resume or f"runs/{default_name}")
