"""Output checks: whether a file or a family folder can be written is known before any work."""

from pathlib import Path

import pytest

from ziplm_planner.atomic import atomic_write_text, check_creatable_dir, check_writable
from ziplm_planner.errors import UserError


def test_a_folder_with_missing_parents_is_creatable_and_nothing_is_created(tmp_path):
    target = tmp_path / "new" / "deeper" / "family"
    assert check_creatable_dir(target) == target
    assert check_creatable_dir(tmp_path) == tmp_path  # an existing folder is fine too
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("check,relative,message", [
    (check_creatable_dir, "afile", "afile is a file: give a directory"),
    (check_creatable_dir, "afile/child/family", "afile is a file, not a folder"),
    (check_writable, "afile/t.json", "afile is a file, not a folder"),
    (check_writable, "missing/t.json", "folder .*missing does not exist"),
    (check_writable, ".", "is a directory: give a file name"),
])
def test_a_file_in_the_way_is_refused(tmp_path, check, relative, message):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match=message):
        check(tmp_path / relative)


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs Linux /proc")
@pytest.mark.parametrize("check", [check_creatable_dir, check_writable])
def test_an_unwritable_folder_is_refused_even_for_root(check):
    # /proc passes os.access for root, but nothing can be created in it
    with pytest.raises(UserError, match="folder /proc is not writable"):
        check(Path("/proc/ziplm-output"))


def test_checks_and_writes_leave_no_temporary_files(tmp_path):
    check_creatable_dir(tmp_path)
    check_writable(tmp_path / "t.json")
    atomic_write_text(tmp_path / "t.json", "{}")
    assert [p.name for p in tmp_path.iterdir()] == ["t.json"]
