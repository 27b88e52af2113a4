"""A run's own files planted by someone else (issue 26, classes 2 and 3): `latest`, `run.lock`, manifests
and the files they list are read inside their folder, as regular files, with a size cap, never echoed;
checkpoint folders that lie are skipped by every command through one verified choice, the tools
changing nothing. Folders are made by hand here (a real torch file where one is read), so each plant
costs no training; tests/pretrain/checkpoint/test_checkpoint.py does the same on real runs."""

import json
import os
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import choice, run_lock
from pretrain.checkpoint import store as checkpoint
from pretrain.checkpoint.files import MANIFEST, CheckpointError, digest
from pretrain.checkpoint.resume_check import refuse_before_data
from pretrain.checks import compose_config
from pretrain.config import ConfigError

SECRET = "root:x:0:0:secret-line"  # what a planted link points at; must never appear in a message
MODEL_STATES = "zero_pp_rank_0_mp_rank_00_model_states.pt"


@contextmanager
def within(seconds: int):
    """Fails the test (instead of hanging it) when the block blocks: a FIFO opened for reading would."""
    def expired(signum, frame):
        raise AssertionError(f"blocked for more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def secret(tmp_path) -> Path:
    path = tmp_path / "outside" / "passwd"
    path.parent.mkdir()
    path.write_text(SECRET + "\n")
    return path


def make_checkpoint(root: Path, step: int, config: dict | None = None) -> Path:
    """A checkpoint folder that passes choice.verify: a real (weights-only) torch file, a trainer state,
    a manifest with their sizes and hashes."""
    folder = root / checkpoint.tag(step)
    folder.mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}}, folder / MODEL_STATES)
    (folder / "trainer_state_rank0.json").write_text(json.dumps({"step": step}))
    files = {name: digest(folder / name) for name in (MODEL_STATES, "trainer_state_rank0.json")}
    write_manifest(folder, {"format": 1, "step": step, "world_size": 1,
                            "config": config or {"model": {"n_layers": 4}}, "files": files})
    return folder


def write_manifest(folder: Path, manifest: dict) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest))


def tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() and not p.is_symlink() else b"<link>"
            for p in sorted(directory.rglob("*"))}


def plant_file(path: Path, plant: str, secret: Path, text: str) -> None:
    """What someone else put under a name the run reads: a link out of the run, a link to /dev/zero, a FIFO,
    a folder, or a regular file holding `text` (any other plant)."""
    if plant == "link-outside":
        path.symlink_to(secret)
    elif plant == "link-dev-zero":
        path.symlink_to("/dev/zero")
    elif plant == "fifo":
        os.mkfifo(path)
    elif plant == "folder":
        path.mkdir()
    else:
        path.write_text(text)


# -- class 2: pointers, locks, manifests and what they list ----------------------------------------------
@pytest.mark.parametrize("plant", ["link-outside", "link-dev-zero", "fifo", "large", "folder"])
def test_a_hostile_latest_is_described_never_read(tmp_path, secret, plant):
    root = tmp_path / "run" / "checkpoints"
    root.mkdir(parents=True)
    latest = root / "latest"
    plant_file(latest, plant, secret, SECRET * 1000)
    with within(10):
        text = choice.read_pointer(latest)
    assert SECRET not in (text or "") and "root:" not in (text or "")
    if plant != "folder":
        assert text.startswith("<not read: ") and "\n" not in text


@pytest.mark.parametrize("plant", ["link-outside", "link-dev-zero", "fifo", "large"])
def test_a_hostile_run_lock_is_an_unreadable_lock_and_never_read(tmp_path, secret, plant):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = run_dir / run_lock.LOCK
    plant_file(lock, plant, secret, json.dumps({"host": "h", "pid": 1, "pad": SECRET * 1000}))
    with within(10), pytest.raises(run_lock.RunLockError) as err:
        run_lock.acquire(str(run_dir), stale_s=60)
    assert "not a lock this framework wrote (unreadable)" in str(err.value)
    assert SECRET not in str(err.value) and "\n" not in str(err.value)
    # Untouched for longer than the limit, it is taken over like any unreadable lock: the plant itself is
    # renamed away, its target (outside run_dir) never opened.
    os.utime(lock, (0, 0), follow_symlinks=False)
    with within(10):
        taken = run_lock.acquire(str(run_dir), stale_s=60)
    try:
        assert taken.is_mine() and lock.is_file() and not lock.is_symlink()
        assert secret.read_text() == SECRET + "\n"
    finally:
        taken.release()


@pytest.mark.parametrize("plant, problem", [
    ("manifest-link-outside", "outside"),
    ("manifest-dev-zero", "outside"),
    ("manifest-fifo", "not a regular file (a FIFO)"),
    ("manifest-large", "larger than"),
    ("entry-dotdot", "not a file name inside the folder"),
    ("entry-absolute", "not a file name inside the folder"),
    ("listed-link-outside", "outside"),
    ("listed-fifo", "not a regular file"),
    ("unlisted-file", "not in the manifest"),
    ("link-to-root", "not in the manifest"),  # a link to / is named, not walked
    ("no-config", "lacks the run's config"),
    ("no-files", "lists no files"),
    ("no-model-states", "lists no model states"),
    ("other-step", "says step 3, the folder is step00000002"),
    ("no-trainer-state", "no trainer state for rank 1 of 2"),
])
def test_a_checkpoint_that_lies_is_refused_in_one_line_naming_it(tmp_path, secret, plant, problem):
    folder = make_checkpoint(tmp_path / "checkpoints", 2)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest_path = folder / MANIFEST
    if plant.startswith("manifest-"):
        manifest_path.unlink()
        {"manifest-link-outside": lambda: manifest_path.symlink_to(secret),
         "manifest-dev-zero": lambda: manifest_path.symlink_to("/dev/zero"),
         "manifest-fifo": lambda: os.mkfifo(manifest_path),
         "manifest-large": lambda: manifest_path.write_text(" " * (65 << 20) + "{}")}[plant]()
    elif plant in ("entry-dotdot", "entry-absolute"):
        name = "../../../../dev/zero" if plant == "entry-dotdot" else "/dev/zero"
        manifest["files"][name] = {"size": 0, "sha256": "0" * 64}
        write_manifest(folder, manifest)
    elif plant == "listed-link-outside":
        (folder / "trainer_state_rank0.json").unlink()
        (folder / "trainer_state_rank0.json").symlink_to(secret)
    elif plant == "listed-fifo":
        (folder / "trainer_state_rank0.json").unlink()
        os.mkfifo(folder / "trainer_state_rank0.json")
    elif plant == "unlisted-file":
        (folder / "zero_pp_rank_1_mp_rank_00_model_states.pt").write_bytes(b"planted")
    elif plant == "link-to-root":
        (folder / "sub").symlink_to("/")
    else:
        edit = {"no-config": lambda m: m.pop("config"), "no-files": lambda m: m.update(files={}),
                "no-model-states": lambda m: m["files"].pop(MODEL_STATES), "other-step": lambda m: m.update(step=3),
                "no-trainer-state": lambda m: m.update(world_size=2)}[plant]
        edit(manifest)
        write_manifest(folder, manifest)
    with within(20):
        found, _ = choice.verify(folder)
    assert found is not None and problem in found, found
    assert "\n" not in found and SECRET not in found


# -- class 3: one verified choice; the tools skip and change nothing --------------------------------------
def plant_liars(root: Path) -> None:
    """Newer folders than the good step 2, each lying another way."""
    (root / checkpoint.tag(99999)).mkdir()
    (root / checkpoint.tag(99999) / MANIFEST).write_bytes(os.urandom(300))  # a random manifest
    for step, edit in ((90000, lambda m: m.pop("config")), (80000, lambda m: m.update(files={}))):
        folder = make_checkpoint(root, step)
        manifest = json.loads((folder / MANIFEST).read_text())
        edit(manifest)
        write_manifest(folder, manifest)


def test_the_tools_choice_skips_every_liar_in_one_line_each_and_changes_nothing(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    make_checkpoint(root, 2)
    plant_liars(root)
    before = tree(tmp_path / "run")
    lines = []
    chosen = choice.choose(tmp_path / "run", warn=lines.append)
    assert chosen.tag == "step00000002"
    expected = [f"warning: skipping checkpoint {checkpoint.tag(s)}" for s in (99999, 90000, 80000)]
    assert [": ".join(line.split(": ")[:2]) for line in lines] == expected
    assert "does not parse" in lines[0] and "lacks the run's config" in lines[1] and "lists no files" in lines[2]
    assert tree(tmp_path / "run") == before
    with pytest.raises(CheckpointError) as err:
        choice.choose(tmp_path / "run", step=90000)
    assert str(err.value).startswith("checkpoint step00090000 is not usable: ") and "\n" not in str(err.value)


def test_a_planted_pickle_is_skipped_by_the_tools_and_refused_by_step(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    make_checkpoint(root, 2)
    folder = make_checkpoint(root, 4)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"module": Payload()}, folder / MODEL_STATES)
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"][MODEL_STATES] = digest(folder / MODEL_STATES)  # the manifest is integrity, not trust
    write_manifest(folder, manifest)
    lines = []
    assert choice.choose(tmp_path / "run", warn=lines.append).tag == "step00000002"
    assert len(lines) == 1 and "would unpickle io.open" in lines[0]
    with pytest.raises(CheckpointError, match="checkpoint step00000004 is not usable: .*would unpickle io.open"):
        choice.choose(tmp_path / "run", step=4)
    assert not marker.exists()


def test_a_checkpoint_folder_linked_from_outside_is_not_a_candidate(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    make_checkpoint(root, 2)
    elsewhere = make_checkpoint(tmp_path / "elsewhere", 7)
    (root / checkpoint.tag(7)).symlink_to(elsewhere)
    assert choice.candidates(root) == ["step00000002"]


def test_the_pre_data_resume_check_skips_a_manifest_without_config(tmp_path):
    run = compose_config([f"run_dir={tmp_path / 'run'}", "model=tiny"])
    from pretrain.checkpoint.resume_check import config_dict

    make_checkpoint(tmp_path / "run" / "checkpoints", 2, config=config_dict(run))
    plant_liars(tmp_path / "run" / "checkpoints")  # was: the config-less manifest refused the whole resume
    refuse_before_data(run)
    other = compose_config([f"run_dir={tmp_path / 'run'}", "model=tiny", "model.n_layers=2"])
    with pytest.raises(ConfigError, match="step00000002 was trained with another model"):
        refuse_before_data(other)


@pytest.mark.parametrize("plant", ["link-outside", "link-dev-zero", "fifo", "large", "not-a-config"])
def test_a_hostile_run_config_is_refused_in_one_line_never_read(tmp_path, secret, plant):
    """export, evaluate and generate open a run through open_source, which reads its config.yaml."""
    from pretrain.hf.pretrained import SourceError, open_source

    run = tmp_path / "run"
    run.mkdir()
    config = run / "config.yaml"
    plant_file(config, plant, secret, "model: {}\n# " + SECRET * 300_000 if plant == "large" else SECRET + "\n")
    with within(10), pytest.raises(SourceError) as e:
        open_source(run)
    message = str(e.value)
    assert str(config) in message and "\n" not in message
    assert SECRET not in message and "root:" not in message
