"""python -m launch.run: the command ends when its ranks have ended, with their exit code; a port in use
is one line. 2 CPU ranks of the real entry point."""

import json
import signal
import socket
import subprocess
import sys

import psutil

from launch.run import exit_code
from tests.conftest import REPO, TRAIN_ARGS, child_env, free_port, read_metrics, run_train
from tests.pretrain.test_faults import processes_using, wait_for_step

LAUNCH = [sys.executable, "-m", "launch.run", "--nproc_per_node", "2", "-m", "pretrain.train"]


def test_sigterm_to_the_command_ends_it_after_its_ranks_with_their_code(tmp_path, demo_shards):
    # deepspeed's runner exited 143 at once while its ranks still finished the step and the save: a
    # wrapper that requeues on 75 saw 143, and a rerun started then met the old ranks' port and lock.
    run_dir = tmp_path / "run"
    cmd = [*LAUNCH, *TRAIN_ARGS, f"data.dir={demo_shards}", f"run_dir={run_dir}", "trainer.max_steps=8",
           "logging.mode=disabled", "fault.sleep_at_step=3", "fault.sleep_s=3"]  # step 3 lasts while the signal lands
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, run_dir, 2)
    ranks = [p for p in psutil.Process(proc.pid).children() if "pretrain.train" in " ".join(p.cmdline())]
    assert len(ranks) == 2
    proc.send_signal(signal.SIGTERM)  # the command alone: it passes the stop to its ranks
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 75, err[-3000:]
    assert not processes_using(run_dir) and not any(p.is_running() for p in ranks)  # ended before it returned
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step[0-9]*[0-9]"))
    states = [json.loads(p.read_text()) for p in (run_dir / "checkpoints" / saved[-1]).glob("trainer_state_rank*.json")]
    assert [s["step"] for s in states] == [int(saved[-1][4:])] * 2 and not (run_dir / "run.lock").exists()
    assert max(r["step"] for r in read_metrics(run_dir)) == int(saved[-1][4:])


def test_a_port_in_use_is_one_line_that_says_how_to_pick_another(tmp_path, demo_shards):
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = [*TRAIN_ARGS, f"data.dir={demo_shards}", f"run_dir={tmp_path / 'run'}", "trainer.max_steps=1"]
        proc = subprocess.run([*LAUNCH[:-2], "--master_port", str(port), *LAUNCH[-2:], *args], cwd=REPO,
                              env=child_env(), capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert proc.stderr.startswith(f"error: MASTER_PORT={port} on {socket.gethostname()} is in use") and \
            "pass another --master_port, or leave it out to get a free one" in proc.stderr
        # Under deepspeed or torchrun (which bind nothing themselves) rank 0's store finds the port taken:
        # that was a DistNetworkError traceback. One rank started as they start it shows the same.
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"}
        proc = run_train([sys.executable, "-m", "pretrain.train"], tmp_path / "ds", demo_shards,
                         "trainer.max_steps=1", check=False, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "Error executing job" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: MASTER_PORT={port} on 127.0.0.1 is in use (another job, or one still finishing, holds "
                      f"it): give the launcher a free one (--master_port P), or leave it out with python -m "
                      f"launch.run, which picks a free port on a single node"], proc.stderr[-3000:]


def test_without_a_port_a_free_one_is_picked_and_every_rank_gets_its_place(tmp_path):
    # deepspeed and torchrun default to 29500: a second run on the machine met the first's port.
    (tmp_path / "show_env.py").write_text("import json, os\nos.write(1, (json.dumps({k: os.environ[k] for k in "
                                          "('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_PORT')}) + '\\n').encode())\n")
    with socket.socket() as busy:
        busy.bind(("", 0))
        busy.listen()
        proc = subprocess.run([sys.executable, "-m", "launch.run", "--nproc_per_node", "3", "-m", "show_env"],
                              cwd=tmp_path, env={**child_env(), "PYTHONPATH": f"{tmp_path}:{REPO}"},
                              capture_output=True, text=True, timeout=60)
        taken = busy.getsockname()[1]
    assert proc.returncode == 0, proc.stderr
    envs = sorted((json.loads(line) for line in proc.stdout.splitlines()), key=lambda e: e["RANK"])
    assert [(e["RANK"], e["LOCAL_RANK"], e["WORLD_SIZE"]) for e in envs] == [("0", "0", "3"), ("1", "1", "3"),
                                                                              ("2", "2", "3")]
    assert len({e["MASTER_PORT"] for e in envs}) == 1 and envs[0]["MASTER_PORT"] != str(taken)


def test_the_exit_code_is_the_ranks():
    assert exit_code([0, 0]) == 0 and exit_code([75, 75]) == 75 and exit_code([75, 0]) == 75
    assert exit_code([1, 2]) == 2  # a rank's own diagnosis (a data error) before its peer's dead-peer failure
    assert exit_code([137, 1]) == 137 and exit_code([75, 1]) == 1
    assert free_port() > 0


def test_a_config_error_under_launch_run_is_one_line_not_one_per_rank(tmp_path, demo_shards):
    args = [*TRAIN_ARGS, f"data.dir={demo_shards}", f"run_dir={tmp_path / 'run'}", "trainer.max_steps=1",
            "trainer.seq_len=128"]  # the shards are of 64 tokens: every rank finds it before the process group
    proc = subprocess.run([*LAUNCH, *args], cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert "add trainer.seq_len=64" in errors[0]
