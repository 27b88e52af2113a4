"""Metrics of a real training run, resumed once: metrics.jsonl, the console line, and the W&B offline
run files read back record by record."""

import json
import struct
import time
from pathlib import Path

import pytest

from pretrain.checks import compose_config
from pretrain.model.flops import flops_per_token
from pretrain.monitor.metrics import resolve_wandb_mode
from tests.conftest import MONITOR_PEAK_TFLOPS, SEQ_LEN, read_metrics

PEAK = MONITOR_PEAK_TFLOPS


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file. W&B 0.31 no longer ships a Python reader; the format is
    LevelDB's log: a 7-byte file header (":W&B", magic 0xBEE1, version 0), then 32 KiB blocks of
    chunks, each a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and data;
    a block's tail shorter than a header is padding."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:7] == b":W&B\xe1\xbe\x00", f"{path}: not a W&B transaction log"
    records, pending, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history(records) -> list[dict]:
    return [{item.nested_key[0] if item.nested_key else item.key: json.loads(item.value_json)
             for item in r.history.item} for r in records if r.WhichOneof("record_type") == "history"]


def test_metrics_jsonl_has_the_run_metrics(resumed_run):
    run_dir, _ = resumed_run
    train = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4]
    times = [r["time"] for r in read_metrics(run_dir)]  # every row, eval rows included: wall-clock seconds
    assert times == sorted(times) and time.time() - 3600 < times[0] <= times[-1] <= time.time()
    flops = flops_per_token(compose_config(["model=tiny", "model.vocab_size=1024"]).model, SEQ_LEN)
    for r in train:
        assert 0 <= r["masked_acc"] <= 1 and r["masked_ce"] > 0
        assert any(k.startswith("loss_by_t/") for k in r) and any(k.startswith("ce_by_t/") for k in r)
        assert set(k.split("/")[1] for k in r if "_by_t/" in k) <= {"0-0.25", "0.25-0.5", "0.5-0.75", "0.75-1"}
        assert r["tokens_per_s_per_device"] == pytest.approx(r["tokens_per_s"])  # one process
        assert r["tflops_per_device"] == pytest.approx(r["tokens_per_s"] * flops / 1e12)
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / (PEAK * 1e12))
        assert r["step_time_s"] > 0 and 0 <= r["data_wait_share"] < 1
        assert r["mem/rss_gb"] > 0.05
        assert r["skipped_steps"] == 0
        # the batch is 8 sequences of 64 (or 1% of batches cut shorter): a step's time explains its throughput
        assert r["tokens_per_s"] * r["step_time_s"] == pytest.approx(8 * SEQ_LEN, rel=0.02) or r["step"] in (1, 3)


def test_console_prints_one_line_per_log_step(resumed_run):
    _, stdout = resumed_run
    lines = [line for line in stdout.splitlines() if line.startswith("step ") and "| loss " in line]
    assert len(lines) == 4
    for line in lines:
        assert all(part in line for part in ("acc ", "lr ", "gnorm ", "tok/s", "TFLOP/s/dev", "MFU ", "s/step",
                                             "rss "))


def test_wandb_offline_files_hold_the_metrics_and_the_config(resumed_run):
    run_dir, _ = resumed_run
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    # one folder per process, each with the kept id: `wandb sync` uploads both into one W&B run
    assert len(folders) == 2 and all(f.name.endswith(f"-{run_id}") for f in folders)
    steps = []
    for phase, folder in enumerate(folders):
        records = read_wandb_records(folder / f"run-{run_id}.wandb")
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.run_id == run_id and run.run_group == "monitor-test" and list(run.tags) == ["cpu", "tiny"]
        assert run.display_name == "watched" and run.project == "llada-pretrain"
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        # the whole resolved Hydra config, as the run's config.yaml has it
        assert config["model"]["name"] == "tiny" and config["model"]["vocab_size"] == 1024
        assert config["trainer"]["max_steps"] == [2, 4][phase] and config["run_dir"] == str(run_dir)
        assert config["logging"]["t_buckets"] == 4 and config["cluster"]["peak_tflops"] == PEAK
        rows = history(records)
        train = [h for h in rows if "loss" in h]
        assert train and all(k in h for h in train for k in ("loss", "masked_acc", "masked_ce", "lr", "grad_norm",
                                                              "tokens_per_s", "tokens_per_s_per_device",
                                                              "tflops_per_device", "mfu", "step_time_s",
                                                              "data_wait_share", "mem/rss_gb", "skipped_steps"))
        assert all(any(k.startswith("loss_by_t/") for k in h) for h in train)
        assert any("eval/loss" in h for h in rows)
        steps += [h["_step"] for h in train]
    assert steps == [1, 2, 3, 4]  # the resumed process continues the W&B run's steps
    jsonl = {r["step"]: r for r in read_metrics(run_dir) if "loss" in r}
    last = [h for h in history(read_wandb_records(folders[1] / f"run-{run_id}.wandb")) if "loss" in h][-1]
    assert last["loss"] == pytest.approx(jsonl[4]["loss"]) and last["mfu"] == pytest.approx(jsonl[4]["mfu"])


def test_wandb_mode_auto(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("NETRC", raising=False)
    assert resolve_wandb_mode("auto", "cpu") == "offline"
    assert resolve_wandb_mode("auto", "cuda") == "offline"  # no credentials: the metrics stay on disk
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert resolve_wandb_mode("auto", "cuda") == "online"
    assert resolve_wandb_mode("auto", "cpu") == "offline"
    assert resolve_wandb_mode("disabled", "cuda") == "disabled"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert resolve_wandb_mode("auto", "cuda") == "disabled"


def logger(run_dir: Path, mode: str):
    from types import SimpleNamespace

    from pretrain.monitor.metrics import MetricsLogger

    cfg = SimpleNamespace(mode=mode, project="p", entity=None, group=None, tags=[], name=None)
    return MetricsLogger(str(run_dir), cfg, {"seed": 0}, enabled=True)


def test_a_dead_wandb_service_is_one_warning_and_the_record_goes_on(tmp_path, capfd):
    # What a job-wide SIGTERM (scancel, SLURM preemption) does to W&B: its service process dies with the
    # ranks' signal, and every call into wandb raises ConnectionResetError. That must not end the run.
    import signal

    import psutil

    metrics = logger(tmp_path, "offline")
    metrics.log({"step": 1, "loss": 2.0})
    for child in psutil.Process().children(recursive=True):
        if child.name().startswith("wandb"):
            child.send_signal(signal.SIGTERM)
    psutil.wait_procs([c for c in psutil.Process().children(recursive=True) if c.name().startswith("wandb")],
                      timeout=10)
    for step in (2, 3):
        metrics.log({"step": step, "loss": 1.0})
    metrics.close()
    err = capfd.readouterr().err
    # The message of the reset depends on the moment wandb's client notices ("Connection lost" or the OS's).
    warnings = [line for line in err.splitlines() if line.startswith("warning: W&B failed")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: W&B failed at step 2 (ConnectionResetError: ") \
        and warnings[0].endswith("metrics.jsonl keeps the record, W&B is off for the rest of this run"), err
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]


def test_a_full_disk_loses_whole_records_never_a_line(tmp_path, capfd):
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here: needs root")
    try:
        metrics = logger(mount, "disabled")
        metrics.log({"step": 1, "loss": 2.0})
        filler = mount / "filler"
        with open(filler, "wb", buffering=0) as f:  # fill the disk to the last byte
            for size in (4096, 1):
                try:
                    while f.write(b"x" * size):
                        pass
                except OSError:
                    pass
        big = {"step": 2, "note": "y" * 20000}  # cannot fit: a plain write would leave part of it
        metrics.log(big)
        metrics.log({**big, "step": 3})
        text = (mount / "metrics.jsonl").read_text()  # one whole line: step 1's record and its time
        assert text.endswith("}\n") and text.count("\n") == 1 and read_metrics(mount)[0]["loss"] == 2.0
        filler.unlink()
        metrics.log({"step": 4})
        assert [r["step"] for r in read_metrics(mount)] == [1, 4]
        err = capfd.readouterr().err
        assert "metrics.jsonl: step 2 not recorded (No space left on device); training goes on" in err
        assert "metrics.jsonl: writing again; 2 record(s) before step 4 were lost" in err
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_torn_last_line_is_dropped_on_resume(tmp_path, capfd):
    from pretrain.monitor.metrics import trim_jsonl

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    trim_jsonl(path, start_step=2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert "dropped 1 line(s) that are not whole records (line 3...)" in capfd.readouterr().err
