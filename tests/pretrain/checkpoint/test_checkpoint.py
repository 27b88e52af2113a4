"""Checkpoints under faults, with the real entry point and DeepSpeed (2 ranks where it matters): kill -9
and a full disk during a save, damaged files, a `latest` that points nowhere, retention, time-based
saves, the run_dir lock, resume refused on another model, and resume at another world size."""

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pretrain.checkpoint import ds_names
from pretrain.checkpoint import store as checkpoint
from pretrain.checkpoint.files import MANIFEST
from pretrain.checkpoint.zero_files import load_engine_file
from tests.conftest import (
    BIN,
    PRECISIONS,
    REPO,
    TRAIN_ARGS,
    child_env,
    read_metrics,
    run_precision,
    run_train,
    train_losses,
)

PYTHON = [sys.executable, "-m", "pretrain.train"]
# global 12 = micro 2 x accumulation 3 x 2 ranks = 2 x 6 x 1 = 2 x 2 x 3: worlds 1, 2 and 3 all fit.
SHAPE = ("trainer.micro_batch_size=2", "trainer.global_batch_size=12", "logging.mode=disabled")


def torchrun(n: int, port: int, script: list[str] | None = None) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(n), "--master_port", str(port),
            *(script or ["-m", "pretrain.train"])]


def run_ranks(n: int, port: int, run_dir: Path, data_dir: Path, *overrides: str, check: bool = True,
              timeout: int = 400) -> subprocess.CompletedProcess:
    """run_train under torchrun with n ranks; on a timeout every rank is killed too (torchrun starts
    each rank in a session of its own, so killing torchrun alone would leave them running)."""
    cmd = [*torchrun(n, port), *TRAIN_ARGS, f"data.dir={data_dir}", f"run_dir={run_dir}", *overrides]
    job = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = job.communicate(timeout=timeout)
    finally:
        kill_job(job)
    proc = subprocess.CompletedProcess(cmd, job.returncode, out, err)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{out[-3000:]}\n{err[-5000:]}")
    return proc


def tags(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step"))


def fp32_weights(ckpt: Path) -> list[torch.Tensor]:
    """The fp32 master weights of every rank."""
    out = []
    for f in ds_names.optim_files(ckpt):
        out += load_engine_file(f)["optimizer_state_dict"]["fp32_flat_groups"]
    return out


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = fp32_weights(a), fp32_weights(b)
    assert len(wa) == len(wb) > 0 and all(torch.equal(x, y) for x, y in zip(wa, wb, strict=True))


def kill_job(job: subprocess.Popen) -> None:
    """kill -9 of the launcher and every rank (torchrun starts each rank in a session of its own)."""
    import psutil

    try:
        procs = [psutil.Process(job.pid), *psutil.Process(job.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)  # orphaned ranks may stay zombies here
    job.wait()


def file_hashes(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def optim_name(rank: int, precision: str) -> str:
    """DeepSpeed's name for a rank's optimizer file, spelt out here as a check on pretrain/checkpoint/ds_names.py."""
    return f"{'bf16_' if precision == 'bf16' else ''}zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


# Every test that writes or reads checkpoints runs in both precisions, whatever the host's auto picks.
@pytest.fixture(scope="module", params=PRECISIONS)
def precision(request) -> str:
    return request.param


# -- two ranks: the uninterrupted reference, kill -9 and a full disk during a save -----------------------
@pytest.fixture(scope="module")
def reference(tmp_path_factory, demo_shards, precision):
    run_dir = tmp_path_factory.mktemp(f"ckpt-{precision}") / "reference"
    run_ranks(2, 29621, run_dir, demo_shards, *SHAPE, "trainer.max_steps=6", "trainer.ckpt_every=3",
              "trainer.keep_last=0", "fault.record_samples=true", f"trainer.precision={precision}")
    return run_dir


def test_manifest_records_every_file_and_the_run(reference, precision):
    step3 = reference / "checkpoints" / "step00000003"
    manifest = json.loads((step3 / MANIFEST).read_text())
    on_disk = {p.name for p in step3.iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk
    assert {"trainer_state_rank0.json", "trainer_state_rank1.json", optim_name(1, precision)} <= on_disk
    assert ds_names.optim_files(step3) == [step3 / optim_name(r, precision) for r in range(2)]
    assert manifest["config"]["trainer"]["precision"] == precision
    assert manifest["step"] == 3 and manifest["world_size"] == 2 and manifest["tokens"] == 3 * 12 * 64
    assert manifest["config"]["model"]["n_layers"] == 4 and len(manifest["config_hash"]) == 16
    assert manifest["data_fingerprint"] and manifest["code_version"] != "unknown"
    states = [json.loads((step3 / f"trainer_state_rank{r}.json").read_text()) for r in range(2)]
    assert all(s["step"] == 3 and s["torch_rng"] for s in states)
    # Another world size hands rank 0's data state to every rank: it must say what every rank consumed.
    assert states[0]["data"] == states[1]["data"]
    assert (reference / "checkpoints" / "latest").read_text() == "step00000006"
    assert checkpoint.latest(str(reference)) == "step00000006"
    assert not (reference / "run.lock").exists()


def test_kill_during_a_save_resumes_from_the_previous_checkpoint(tmp_path, demo_shards, reference, precision):
    run_dir = tmp_path / "killed"
    cmd = [*torchrun(2, 29622, [str(REPO / "tests" / "pretrain" / "slow_save.py")]), *TRAIN_ARGS, *SHAPE,
           f"data.dir={demo_shards}", f"run_dir={run_dir}", "trainer.max_steps=6", "trainer.ckpt_every=3",
           "trainer.keep_last=0", "fault.record_samples=true", f"trainer.precision={precision}"]
    env = {**child_env(), "SLOW_SAVE_MATCH": "step00000006", "SLOW_SAVE_S": "300"}
    job = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           start_new_session=True)
    try:
        partial = run_dir / "checkpoints" / "step00000006.partial"
        deadline = time.monotonic() + 240
        while not (partial / optim_name(0, precision)).is_file():
            assert job.poll() is None and time.monotonic() < deadline, "the job never reached its second save"
            time.sleep(0.2)
        # While it hangs in the save, a second job on the same run_dir is refused.
        second = run_train(PYTHON, run_dir, demo_shards, *SHAPE, "trainer.max_steps=6",
                           f"trainer.precision={precision}", check=False)
        assert second.returncode == 2 and "run_dir is in use by pid" in second.stderr
        kill_job(job)
    finally:
        kill_job(job)
    assert checkpoint.latest(str(run_dir)) == "step00000003" and "step00000006" not in tags(run_dir)

    proc = run_ranks(2, 29623, run_dir, demo_shards, *SHAPE, "trainer.max_steps=6", "trainer.ckpt_every=3",
                     "trainer.keep_last=0", "fault.record_samples=true", f"trainer.precision={precision}")
    assert "taking over" in proc.stdout and "not running" in proc.stdout  # the killed job's lock
    assert "ignoring" in proc.stdout and "resumed from" in proc.stdout and "at step 3" in proc.stdout
    assert train_losses(run_dir) == train_losses(reference)
    assert_same_samples(run_dir, reference)
    assert_same_weights(run_dir / "checkpoints" / "step00000006", reference / "checkpoints" / "step00000006")


def assert_same_samples(run_dir: Path, reference: Path) -> None:
    """Every step trained on the windows of the uninterrupted run: none lost, none repeated."""
    for rank in range(2):
        steps = (1, 2, 3, 4, 5, 6)
        assert samples_of(run_dir, rank, steps) == samples_of(reference, rank, steps)


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or 'mount failed'}): needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("precision", ["fp32"], indirect=True)  # the logic here does not depend on it
def test_full_disk_during_a_save_keeps_the_previous_checkpoint(small_disk, demo_shards, reference, precision):
    run_dir = small_disk / "run"
    # One checkpoint of this model on 2 ranks takes ~12 MB: the second does not fit in 20 MB.
    proc = run_ranks(2, 29624, run_dir, demo_shards, *SHAPE, "trainer.max_steps=6", "trainer.ckpt_every=3",
                     "trainer.keep_last=0", f"trainer.precision={precision}", check=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert 1 <= len(errors) <= 2  # each rank that saw the disk full, unless the launcher stopped it first
    assert all("step00000006 could not be written" in e and "step00000003 is intact" in e for e in errors)
    # What it is and where, not torch's "inline_container.cc:672 unexpected pos".
    assert all(f"no space left on {run_dir / 'checkpoints'}" in e for e in errors), errors
    assert "inline_container" not in proc.stderr
    assert tags(run_dir) == ["step00000003"]  # the half-written one is gone, its space freed
    intact = file_hashes(run_dir / "checkpoints" / "step00000003")

    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    proc = run_ranks(2, 29625, run_dir, demo_shards, *SHAPE, "trainer.max_steps=6", "trainer.ckpt_every=3",
                     "trainer.keep_last=0", f"trainer.precision={precision}")
    assert "at step 3" in proc.stdout
    assert file_hashes(run_dir / "checkpoints" / "step00000003") == intact
    assert train_losses(run_dir) == train_losses(reference)
    assert_same_weights(run_dir / "checkpoints" / "step00000006", reference / "checkpoints" / "step00000006")


# -- another world size -------------------------------------------------------------------------------
def full_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The whole fp32 model from the ZeRO shards of any world size (DeepSpeed's zero_to_fp32)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)


@pytest.mark.parametrize("world,port", [(1, 29626), (3, 29627)])
def test_resume_at_another_world_size(tmp_path, demo_shards, reference, precision, world, port):
    run_dir = tmp_path / f"world{world}"
    shutil.copytree(reference / "checkpoints" / "step00000003", run_dir / "checkpoints" / "step00000003")
    # lr 1e-30: a step changes no fp32 weight, so the weights after it are exactly the ones loaded.
    args = (*SHAPE, "trainer.max_steps=4", "optim.lr=1e-30", "fault.record_samples=true",
            f"trainer.precision={precision}")
    if world == 1:
        proc = run_train(PYTHON, run_dir, demo_shards, *args)
    else:
        proc = run_ranks(world, port, run_dir, demo_shards, *args)
    assert f"written by 2 ranks, this run has {world}" in proc.stdout and "at step 3" in proc.stdout
    step4 = run_dir / "checkpoints" / "step00000004"
    assert json.loads((step4 / MANIFEST).read_text())["world_size"] == world
    loaded, saved = full_weights(step4), full_weights(reference / "checkpoints" / "step00000003")
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)
    # The lr schedule continues at step 4, and so does the loss (other masks: close, not equal).
    ref = {r["step"]: r for r in read_metrics(reference) if "loss" in r}
    got = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    assert sorted(got) == [4] and got[4]["lr"] / 1e-30 == pytest.approx(ref[4]["lr"] / 3e-3, rel=1e-5)
    assert abs(got[4]["loss"] - ref[4]["loss"]) < 0.3
    # The data: step 4 trains on 12 windows that none of steps 1-3 (2 ranks) read.
    before = [tuple(s) for r in range(2) for s in samples_of(reference, r, steps=(1, 2, 3))]
    after = [tuple(s) for r in range(world) for s in samples_of(run_dir, r, steps=(4,))]
    assert len(before) == 36 and len(after) == 12 and len(set(before + after)) == 48


def samples_of(run_dir: Path, rank: int, steps: tuple[int, ...]) -> list[list[int]]:
    """The (epoch, window id) pairs a rank trained on at these steps (fault.record_samples)."""
    lines = (run_dir / "samples" / f"rank{rank}.jsonl").read_text().splitlines()
    return [s for line in lines if (r := json.loads(line))["step"] in steps for s in r["samples"]]


# -- one process: damaged checkpoints, retention, refusals -------------------------------------------------
@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, demo_shards, precision):
    """A single-process run with complete checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp(f"ckpt1-{precision}") / "run"
    run_train(PYTHON, run_dir, demo_shards, "logging.mode=disabled", "trainer.max_steps=4", "trainer.ckpt_every=2",
              f"trainer.precision={precision}")
    assert tags(run_dir) == ["step00000002", "step00000004"]
    return run_dir


@pytest.fixture
def run_copy(two_checkpoints, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(two_checkpoints, copy)
    return copy


def rerun(run_dir: Path, data: Path, *overrides: str, steps: int = 4, check: bool = True):
    """The same command again, in the precision the run trained in."""
    return run_train(PYTHON, run_dir, data, "logging.mode=disabled", f"trainer.max_steps={steps}",
                     f"trainer.precision={run_precision(run_dir)}", *overrides,
                     check=check)


def optim_file(run_dir: Path, step: int) -> Path:
    """Rank 0's optimizer file of a checkpoint (bf16_zero_pp_rank_0_... in a bf16 run)."""
    return ds_names.optim_files(run_dir / "checkpoints" / checkpoint.tag(step))[0]


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_flipped_byte_falls_back_to_the_previous_checkpoint(run_copy, demo_shards):
    damaged = optim_file(run_copy, 4)
    flip_byte(damaged, damaged.stat().st_size // 2)  # inside a weight tensor: torch.load would not notice
    proc = rerun(run_copy, demo_shards)
    assert f"skipping checkpoint step00000004: {damaged}: content differs" in proc.stdout
    # The trainer, holding run.lock, moved it aside: no later resume or tool meets it again.
    assert "moved aside to step00000004.rejected" in proc.stdout
    assert (run_copy / "checkpoints" / "step00000004.rejected" / damaged.name).is_file()
    assert "at step 2" in proc.stdout and sorted(train_losses(run_copy)) == [1, 2, 3, 4]
    assert checkpoint.latest(str(run_copy)) == "step00000004"  # re-written, now whole
    manifest = json.loads((run_copy / "checkpoints" / "step00000004" / MANIFEST).read_text())
    assert manifest["files"][damaged.name]["sha256"]


def test_no_usable_checkpoint_is_one_error_and_changes_nothing(run_copy, demo_shards):
    for step in (2, 4):
        flip_byte(optim_file(run_copy, step), 1000)
    before = file_hashes(run_copy)
    proc = rerun(run_copy, demo_shards, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1
    assert "no usable checkpoint" in errors[0]
    assert f"step00000004/{optim_file(run_copy, 4).name}: content differs" in errors[0]
    assert "step " not in proc.stdout  # no training
    after = file_hashes(run_copy)
    assert {k: v for k, v in after.items() if k != "run.lock"} == before


def test_truncated_file_bad_json_and_bad_manifest_are_named(run_copy, demo_shards):
    step2, step4 = run_copy / "checkpoints" / "step00000002", run_copy / "checkpoints" / "step00000004"
    optim = optim_file(run_copy, 4)
    with open(optim, "r+b") as f:
        f.truncate(1000)
    proc = rerun(run_copy, demo_shards)
    assert f"skipping checkpoint step00000004: {optim}: 1000 bytes, the manifest says" in proc.stdout
    assert "at step 2" in proc.stdout
    # A trainer state that does not parse (same size, so only the checksum tells) and a manifest that
    # does not parse: no usable checkpoint is left, and each is named.
    state = step2 / "trainer_state_rank0.json"
    state.write_text("{not json".ljust(state.stat().st_size))
    (step4 / MANIFEST).write_text("{not json")
    proc = rerun(run_copy, demo_shards, check=False)
    assert proc.returncode == 2
    assert f"skipping checkpoint step00000004: {step4 / MANIFEST}: the checkpoint manifest does not parse" \
        in proc.stdout
    assert f"skipping checkpoint step00000002: {state}: content differs" in proc.stdout
    assert f"no usable checkpoint in {run_copy / 'checkpoints'} (2 found; newest: {step4 / MANIFEST}" in proc.stderr


@pytest.mark.parametrize("precision", ["fp32"], indirect=True)  # the logic here does not depend on it
def test_latest_pointing_nowhere(run_copy, demo_shards):
    root = run_copy / "checkpoints"
    (root / "latest").write_bytes(b"step000\xff\xfe99\n")  # not UTF-8: named in the warning, not a traceback
    proc = rerun(run_copy, demo_shards)  # resumes at step 4 = max_steps: nothing to train
    assert "latest names step000\\xff\\xfe99; the newest usable checkpoint is step00000004" in proc.stdout
    assert "at step 4" in proc.stdout
    for step in ("step00000002", "step00000004"):
        shutil.rmtree(root / step)
    (root / "latest").write_text("step00000099")
    proc = rerun(run_copy, demo_shards, check=False)
    assert proc.returncode == 2 and f"error: {root / 'latest'} names step00000099, which is not in" in proc.stderr


@pytest.mark.parametrize("precision", ["fp32"], indirect=True)  # the logic here does not depend on it
def test_resume_refused_on_another_model_allowed_on_lr(run_copy, demo_shards):
    proc = rerun(run_copy, demo_shards, "model.n_layers=2", "model.d_model=64", check=False)
    assert proc.returncode == 2
    assert "refusing to resume" in proc.stderr and "model.n_layers: 4 -> 2" in proc.stderr \
        and "model.d_model: 128 -> 64" in proc.stderr
    # A new lr is fine; time-based saves (every step here) and retention of the newest 2 go with it.
    proc = rerun(run_copy, demo_shards, "optim.lr=1e-3", "trainer.ckpt_every_minutes=1e-6", "trainer.keep_last=2",
                 "trainer.keep_every=6", steps=7)
    assert "optim.lr: 0.003 -> 0.001" in proc.stdout and "at step 4" in proc.stdout
    lrs = {r["step"]: r["lr"] for r in read_metrics(run_copy) if "lr" in r}
    assert lrs[4] == pytest.approx(3e-3 * (0.1 + 0.9 * 4 / 5)) and lrs[5] == pytest.approx(1e-3)  # the new lr applies
    assert tags(run_copy) == ["step00000006", "step00000007"]  # 5 by the clock, then deleted; 6 kept as a multiple
    rerun(run_copy, demo_shards, "trainer.keep_last=1", "trainer.keep_every=6", "trainer.ckpt_every=1", steps=9)
    assert tags(run_copy) == ["step00000006", "step00000009"]


@pytest.mark.parametrize("precision", ["fp32"], indirect=True)  # the logic here does not depend on it
def test_a_seq_len_change_on_resume_is_refused_before_any_data_is_built(run_copy, tmp_path):
    new_data = tmp_path / "demo-128"  # the demo corpus at the new seq_len: it would be built first
    proc = run_train(PYTHON, run_copy, new_data, "logging.mode=disabled", "trainer.max_steps=6",
                     "trainer.seq_len=128", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"error: {run_copy / 'checkpoints' / 'step00000004'} was trained with another model or data; refusing " \
           f"to resume (trainer.seq_len: 64 -> 128" in proc.stderr
    assert not new_data.exists() and not Path(str(new_data) + ".building").exists()


def test_data_difference_is_refused():
    from pretrain.checkpoint.resume_check import compare

    saved = {"model": {"n_layers": 4}, "optim": {"lr": 0.003}, "trainer": {"seq_len": 64, "max_steps": 4}}
    refused, allowed = compare(saved, {**saved, "optim": {"lr": 0.001}}, "aaaa", "bbbb")
    assert refused == ["data fingerprint: aaaa -> bbbb (other shards in data.dir)"]
    assert allowed == ["optim.lr: 0.003 -> 0.001"]
    refused, _ = compare(saved, {**saved, "trainer": {"seq_len": 128, "max_steps": 9}}, "aaaa", "aaaa")
    assert refused == ["trainer.seq_len: 64 -> 128"]


def test_retention_keeps_the_newest_and_the_multiples(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(1, 11):
        (root / checkpoint.tag(step)).mkdir(parents=True)
        (root / checkpoint.tag(step) / MANIFEST).write_text("{}")
    (root / "step00000011.partial").mkdir()  # an interrupted save
    (root / "step00000012").mkdir()  # no manifest: not complete, not counted as newest
    deleted = checkpoint.retain(str(tmp_path), keep_last=2, keep_every=4)
    assert deleted == [checkpoint.tag(s) for s in (7, 6, 5, 3, 2, 1)]
    assert tags(tmp_path) == [checkpoint.tag(s) for s in (4, 8, 9, 10, 12)]
    assert checkpoint.retain(str(tmp_path), keep_last=0, keep_every=0) == []  # 0: keep all
    assert checkpoint.latest(str(tmp_path)) == "step00000010"


def test_warm_start_keys_must_match_on_resume_and_older_checkpoints_still_resume():
    from pretrain.checkpoint.resume_check import compare

    saved = {"model": {"n_layers": 4, "qkv_bias": False, "rope_scaling": None}}
    refused, _ = compare(saved, {"model": {"n_layers": 4, "qkv_bias": True, "rope_scaling": {"factor": 8.0}}},
                         "a", "a")
    assert refused == ["model.qkv_bias: False -> True", "model.rope_scaling.factor: None -> 8.0"]
    # A checkpoint saved before the keys existed was LLaDA's: the defaults resume it.
    refused, allowed = compare({"model": {"n_layers": 4}}, {"model": {"n_layers": 4, "qkv_bias": False}}, "a", "a")
    assert refused == [] and allowed == []


def plant_pickle(path: Path, marker: Path) -> None:
    """Replaces a checkpoint file by a torch file whose unpickling runs code (creates `marker`), and
    updates the manifest to match: the manifest is integrity, not trust."""
    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"module": Payload()}, path)
    manifest_path = path.parent / MANIFEST
    manifest = json.loads(manifest_path.read_text())
    manifest["files"][path.name] = checkpoint.digest(path)
    manifest_path.write_text(json.dumps(manifest))


def test_a_planted_pickle_is_refused_by_name_and_never_run(run_copy, demo_shards, tmp_path):
    marker = tmp_path / "pwned"
    model_states = "zero_pp_rank_0_mp_rank_00_model_states.pt"
    step2, step4 = run_copy / "checkpoints" / "step00000002", run_copy / "checkpoints" / "step00000004"
    plant_pickle(step4 / model_states, marker)
    proc = rerun(run_copy, demo_shards)
    assert f"warning: skipping checkpoint step00000004: {step4 / model_states}: would unpickle io.open, which " \
           f"DeepSpeed's checkpoint files never hold; refused without unpickling" in proc.stdout
    assert "at step 2" in proc.stdout and not marker.exists()
    plant_pickle(step2 / model_states, marker)
    plant_pickle(step4 / model_states, marker)
    proc = rerun(run_copy, demo_shards, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr
    assert f"newest: {step4 / model_states}: would unpickle io.open" in errors[0]
    assert not marker.exists()
