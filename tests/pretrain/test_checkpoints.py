"""`python -m pretrain.checkpoints RUN_DIR`: a run's checkpoints with their state, on a real run's files."""

import json
import shutil

import pytest

from pretrain.checkpoints import list_checkpoints, main


@pytest.mark.parametrize("trained_run", ["fp32"], indirect=True)  # precision plays no part here
def test_lists_complete_damaged_and_partial_checkpoints(trained_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoints", run / "checkpoints")  # a copy: the session's run stays intact
    root = run / "checkpoints"
    (root / "step00000045.partial").mkdir()  # a save that never finished
    newest = root / "step00000030"
    victim = max((p for p in newest.iterdir() if p.name.endswith(".pt")), key=lambda p: p.stat().st_size)
    manifest = json.loads((newest / "manifest.json").read_text())
    rows = {r["tag"]: r for r in list_checkpoints(run)}
    assert rows["step00000030"]["state"] == "complete" and rows["step00000015"]["state"] == "complete"
    assert rows["step00000030"]["tokens"] == manifest["tokens"] == 30 * 8 * 64
    assert rows["step00000030"]["time"] == manifest["time"] and rows["step00000030"]["world_size"] == 1
    assert rows["step00000030"]["bytes"] > victim.stat().st_size

    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other content: only the hashes see it
    victim.write_bytes(bytes(data))
    assert {r["tag"]: r["state"] for r in list_checkpoints(run)}["step00000030"] == "complete"  # sizes only
    rows = list_checkpoints(run, verify=True)
    assert [r["tag"] for r in rows] == ["step00000045.partial", "step00000030", "step00000015"]
    assert rows[0]["state"] == "partial"
    assert rows[1]["state"] == f"damaged: {victim}: content differs from the manifest's checksum (damaged file)"
    assert rows[2]["state"] == "complete"

    main([str(run), "--verify"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["checkpoint", "step", "tokens"]
    assert "damaged:" in lines[2] and lines[3].startswith("step00000015") and lines[3].endswith("complete   <- resume")


def test_a_folder_without_checkpoints_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main([str(tmp_path)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'checkpoints'}: no such folder (is {tmp_path} a run directory?)\n"
