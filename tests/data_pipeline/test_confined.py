"""data_pipeline.confined: names from data never read outside their root, never a special file,
never past a size cap, and never echoed."""

import os

import pytest

from data_pipeline.confined import UnsafeFileError, inside, open_regular, read_capped


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "run"
    r.mkdir()
    (r / "ok.txt").write_text("hello")
    (tmp_path / "secret").write_text("top secret content")
    return r


@pytest.mark.parametrize("name", ["../secret", "../../../../etc/passwd", "/etc/passwd", "sub/../../secret"])
def test_names_that_leave_the_root_are_refused(root, name):
    with pytest.raises(UnsafeFileError, match="outside"):
        read_capped(root, name, 100)


def test_a_symlink_out_of_the_root_is_refused_and_its_content_never_shown(root, tmp_path):
    (root / "latest").symlink_to(tmp_path / "secret")
    with pytest.raises(UnsafeFileError) as e:
        read_capped(root, "latest", 100)
    assert "top secret" not in str(e.value) and "latest" in str(e.value)


def test_a_root_that_is_a_symlink_is_allowed(root, tmp_path):
    link = tmp_path / "link-to-run"
    link.symlink_to(root)
    assert read_capped(link, "ok.txt", 100) == b"hello"
    assert inside(link, "ok.txt") == (root / "ok.txt").resolve()


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/null", "/dev/urandom"])
def test_devices_are_refused_even_when_linked_from_inside(root, target):
    # a link inside the root to a device: outside the root, and not a regular file either
    (root / "pointer").symlink_to(target)
    with pytest.raises(UnsafeFileError):
        read_capped(root, "pointer", 100)


def test_a_fifo_fails_at_once_instead_of_blocking(root):
    os.mkfifo(root / "latest")
    with pytest.raises(UnsafeFileError, match="FIFO"):
        read_capped(root, "latest", 100)


def test_a_folder_and_a_missing_file_are_one_line_errors(root):
    (root / "d").mkdir()
    with pytest.raises(UnsafeFileError, match="folder"):
        open_regular(root, "d")
    with pytest.raises(FileNotFoundError, match="no such file"):
        open_regular(root, "missing")


def test_the_size_cap_holds(root):
    (root / "big").write_bytes(b"x" * 1000)
    assert read_capped(root, "big", 1000) == b"x" * 1000
    with pytest.raises(UnsafeFileError, match="larger than 999 bytes"):
        read_capped(root, "big", 999)
