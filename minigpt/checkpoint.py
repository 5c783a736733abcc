"""Checkpoints: Transformers folders written atomically, loaded from safetensors only, with manifests.

A stage folder is an ordinary Transformers folder (`model.safetensors`, `config.json`, tokenizer
files) plus `manifest.json`. Every file is written beside its final name and renamed into place,
weights first and manifest last; a crash mid-save leaves the previous checkpoint loadable, or new weights
that the manifest's checksum refuses (never a silent mix).
The manifest records the sha256 of the weights, checked on every load: a damaged file is one clear
error naming the folder, the file and the fix, never a deserialisation traceback.
Resume state (optimizer, scheduler, data position, RNG) lives in `<stage>/resume/`, swapped in as
a whole folder with its own checksums; a damaged one is set aside and the stage starts over.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from minigpt.run import fingerprint_files, git_commit, now, write_json_atomic
from minigpt.tokenizer import tokenizer_files

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"
MANIFEST = "manifest.json"
RESUME = "resume"
CHECKSUMS = "checksums.json"  # {file name: sha256} of a resume folder


class CheckpointError(RuntimeError):
    pass


def save_model(model, out_dir: Path, tokenizer_dir: Path | None = None, manifest: dict | None = None):
    """Save `model` (and the tokenizer files, and the manifest) into `out_dir`, atomically per file."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = getattr(model, "module", model)  # unwrap DDP
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".saving-") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        staged = sorted(Path(tmp).iterdir(), key=lambda p: p.name != WEIGHTS)  # weights first
        for path in staged:
            os.replace(path, out_dir / path.name)
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != out_dir.resolve():
        for path in tokenizer_files(tokenizer_dir):
            tmp_path = out_dir / f".{path.name}.tmp"
            shutil.copyfile(path, tmp_path)
            os.replace(tmp_path, out_dir / path.name)
    if manifest is not None:
        manifest = {**manifest, "sha256": {WEIGHTS: file_sha256(out_dir / WEIGHTS)}}
        write_json_atomic(out_dir / MANIFEST, manifest)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def rebuild_hint(path: Path) -> str:
    """How to remake a damaged checkpoint folder: `make <stage> FORCE=1 RUN=<run>` for a run's stage."""
    path = Path(path)
    stage = read_manifest_quietly(path).get("stage") or path.name
    if path.parent.parent.name == "rounds":  # runs/R/rounds/N/ppo: made by `make rlhf`
        return f"delete {path} and rerun `make rlhf RUN={path.parents[2].name}`"
    return f"rebuild it with `make {stage} FORCE=1 RUN={path.parent.name}`"


def read_manifest_quietly(path: Path) -> dict:
    try:
        manifest = json.loads((Path(path) / MANIFEST).read_text())
        return manifest if isinstance(manifest, dict) else {}
    except (OSError, ValueError):
        return {}


def check_weights(path: Path) -> Path:
    """The safetensors weights of a checkpoint folder, checked against the manifest's sha256.

    Pickle weights are refused; a missing, truncated or altered file is a CheckpointError that names
    the folder, the file and how to rebuild it.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder; {rebuild_hint(path)}")
    if (path / WEIGHTS).exists():
        manifest = read_manifest_quietly(path)
        if (path / MANIFEST).exists() and not manifest:
            raise CheckpointError(f"{path / MANIFEST} is damaged (not a JSON object); {rebuild_hint(path)}")
        expected = manifest.get("sha256", {}).get(WEIGHTS)
        if expected and file_sha256(path / WEIGHTS) != expected:
            raise CheckpointError(f"{path / WEIGHTS} is damaged: its sha256 differs from the one in "
                                  f"{MANIFEST} (a truncated copy or an interrupted write?); {rebuild_hint(path)}")
        return path / WEIGHTS
    pickled = [p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    if pickled:
        raise CheckpointError(f"{path}: refusing to load pickle weights ({', '.join(pickled)}): pickle can run "
                              f"arbitrary code. Convert them to {WEIGHTS} (safetensors) first.")
    present = ", ".join(sorted(p.name for p in path.iterdir())) or "nothing"
    raise CheckpointError(f"{path}: no {WEIGHTS} here (found: {present}); is this a minigpt checkpoint folder?")


def load_causal_lm(path: Path, dtype=torch.float32):
    """A causal LM from a checkpoint folder (safetensors only)."""
    import minigpt  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForCausalLM

    check_weights(path)
    with _unreadable_as_checkpoint_error(path):
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True)


def load_sequence_classifier(path: Path, dtype=torch.float32, num_labels: int = 1):
    """A reward/value model (backbone + `score` head) from a checkpoint folder."""
    import minigpt  # noqa: F401
    from transformers import AutoModelForSequenceClassification

    check_weights(path)
    with _unreadable_as_checkpoint_error(path):
        return AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype, num_labels=num_labels,
                                                                  use_safetensors=True)


class _unreadable_as_checkpoint_error:
    """A checkpoint without checksums (made by hand, or by an older minigpt) that cannot be read."""

    def __init__(self, path):
        self.path = Path(path)

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        from safetensors import SafetensorError

        if isinstance(error, (SafetensorError, json.JSONDecodeError)):
            raise CheckpointError(f"{self.path}: cannot read the checkpoint ({type(error).__name__}: {error}); "
                                  f"{rebuild_hint(self.path)}") from error
        return False


def weights_hash(path: Path) -> str:
    """Short content hash of a checkpoint's weights: the manifest's link to its parent."""
    weights = Path(path) / WEIGHTS
    if not weights.exists():
        return ""
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def make_manifest(stage: str, config, args, parent: Path | None, data_files=(), metrics=None, **extra) -> dict:
    """Where a checkpoint came from: stage, parent and its hash, config, data, seed, commit, time."""
    import dataclasses

    configs = config if isinstance(config, dict) else {type(config).__name__: dataclasses.asdict(config)}
    return {
        "stage": stage,
        "run": args.run,
        "preset": args.preset,
        "parent": str(parent) if parent else None,
        "parent_hash": weights_hash(parent) if parent else None,
        "config": configs,
        "overrides": args.overrides,
        "data": args.data or str(args.run_dir / "data"),
        "data_fingerprint": fingerprint_files(data_files) if data_files else None,
        "seed": args.seed,
        "git_commit": git_commit(),
        "time": now(),
        "metrics": metrics or {},
        **extra,
    }


def read_manifest(path: Path) -> dict:
    if not (Path(path) / MANIFEST).exists():
        return {}
    manifest = read_manifest_quietly(path)
    if not manifest:
        raise CheckpointError(f"{Path(path) / MANIFEST} is damaged (not a JSON object); {rebuild_hint(path)}")
    return manifest


# ---- resume state -------------------------------------------------------------------------------

def save_resume_state(out_dir: Path, model, optimizer, scheduler, state: dict, extra_tensors=None):
    """Everything needed to continue training, swapped into `<out_dir>/resume/` as one folder."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    final = out_dir / RESUME
    tmp = out_dir / f".{RESUME}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model = getattr(model, "module", model)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()
               if not _is_tied_copy(model, k)}, tmp / WEIGHTS)
    # torch.save for optimizer/scheduler/RNG: plain tensors and numbers, loaded with weights_only=True.
    torch.save({"optimizer": optimizer.state_dict() if optimizer else None,
                "scheduler": scheduler.state_dict() if scheduler else None,
                "rng": torch.get_rng_state(), **(extra_tensors or {})}, tmp / "trainer_state.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=2))
    write_checksums(tmp)
    old = out_dir / f".{RESUME}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def _is_tied_copy(model, key: str) -> bool:
    return key == "lm_head.weight" and getattr(model.config, "tie_word_embeddings", False)


def load_resume_state(out_dir: Path, model, optimizer=None, scheduler=None, expect: dict | None = None):
    """Restore model/optimizer/scheduler/RNG from `<out_dir>/resume/`; returns its state dict or None.

    `expect`: entries the saved state must match (e.g. the config); state from a run with another
    config is discarded with a warning rather than silently continued.
    """
    from safetensors.torch import load_file

    out_dir = Path(out_dir)
    folder = out_dir / RESUME
    if not folder.exists() and (out_dir / f".{RESUME}.old").exists():
        folder = out_dir / f".{RESUME}.old"  # a crash between the two renames
    if not (folder / "state.json").exists():
        return None
    damage = checksum_damage(folder)
    if damage:
        set_aside(folder, damage)
        return None
    state = json.loads((folder / "state.json").read_text())
    mismatched = [k for k, v in (expect or {}).items() if state.get(k) != v]
    if mismatched:
        log.warning("%s: resume state was saved with another %s; starting afresh", folder, ", ".join(mismatched))
        clear_resume_state(out_dir)
        return None
    model = getattr(model, "module", model)
    missing, unexpected = model.load_state_dict(load_file(folder / WEIGHTS), strict=False)
    missing = [k for k in missing if not _is_tied_copy(model, k)]
    if missing or unexpected:
        raise CheckpointError(f"{folder}: resume weights do not match the model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    trainer_state = torch.load(folder / "trainer_state.pt", weights_only=True)
    if optimizer is not None and trainer_state["optimizer"] is not None:
        optimizer.load_state_dict(trainer_state["optimizer"])
    if scheduler is not None and trainer_state["scheduler"] is not None:
        scheduler.load_state_dict(trainer_state["scheduler"])
    torch.set_rng_state(trainer_state["rng"])
    state["tensors"] = trainer_state
    return state


def write_checksums(folder: Path, names=None) -> None:
    """Record the sha256 of a folder's files (all, or `names` where present); written last, so its
    presence means the folder is whole."""
    folder = Path(folder)
    files = [folder / n for n in names] if names else sorted(folder.iterdir())
    sums = {p.name: file_sha256(p) for p in files if p.is_file() and p.name != CHECKSUMS}
    write_json_atomic(folder / CHECKSUMS, sums)


def checksum_damage(folder: Path) -> str:
    """What is wrong with a folder of saved state ("" when every file matches its recorded sha256)."""
    folder = Path(folder)
    try:
        sums = json.loads((folder / CHECKSUMS).read_text())
    except FileNotFoundError:
        return f"no {CHECKSUMS} (the save was interrupted)"
    except (OSError, ValueError) as error:
        return f"{CHECKSUMS} is unreadable ({error})"
    for name, expected in sums.items():
        if not (folder / name).is_file():
            return f"{name} is missing"
        if file_sha256(folder / name) != expected:
            return f"{name} is damaged (sha256 differs)"
    return ""


def set_aside(folder: Path, why: str) -> Path:
    """Move damaged saved state out of the way (kept for a post-mortem) and warn: the stage starts over."""
    folder = Path(folder)
    aside = folder.with_name(f"{folder.name.lstrip('.')}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(folder, aside)
    log.warning("%s: %s; set aside as %s, starting this stage over", folder, why, aside.name)
    return aside


def clear_resume_state(out_dir: Path):
    for name in (RESUME, f".{RESUME}.old", f".{RESUME}.tmp"):
        shutil.rmtree(Path(out_dir) / name, ignore_errors=True)
