"""Files and folders written under a temporary name appear whole or not at all, and leave nothing behind."""

import pytest

from ftcli.owned_folders import MARKER_FILE
from ftcli.staging import atomic_write_text, staged_file, staged_folder


def test_atomic_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "recipe.yaml"
    target.write_text("old")
    atomic_write_text(target, "new\n" * 1000)
    assert target.read_text() == "new\n" * 1000
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.yaml"]


def test_a_failed_file_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_text("old")
    with pytest.raises(RuntimeError), staged_file(target) as temporary:
        temporary.write_text("half")
        raise RuntimeError("disk full")
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"] and target.read_text() == "old"


def test_a_folder_is_replaced_whole_or_left_as_it_was(tmp_path):
    final = tmp_path / "step-4"
    with staged_folder(final) as temporary:
        (temporary / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_folder(final) as temporary:
        (temporary / "adapter.safetensors").write_text("half")
        raise RuntimeError("killed")
    assert [p.name for p in tmp_path.iterdir()] == ["step-4"]
    assert sorted(p.name for p in final.iterdir()) == [MARKER_FILE, "old.txt"]

    with staged_folder(final) as temporary:
        assert not any(temporary.iterdir())
        (temporary / "adapter.safetensors").write_text("whole")
    assert [p.name for p in tmp_path.iterdir()] == ["step-4"]
    assert sorted(p.name for p in final.iterdir()) == [MARKER_FILE, "adapter.safetensors"]
