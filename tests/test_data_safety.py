"""Data loss: synth refuses to replace folders it did not write, and the atomic folder swap survives a kill
at every step (old or new set complete, never neither) and clears what a killed run left behind."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from datamodules import atomic, synth
from datamodules.errors import DataError
from stages.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--nodules", "2", "--frames", "3", "--size", "16", "--cases", "2", "--paired-frames", "2",
        "--paired-size", "16", "--workers", "0"]  # fmt: skip


def _synth(out: Path, *extra: str) -> None:
    main(["synth", "--out", str(out), *TINY, *extra])


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _users_folder(out: Path) -> dict[str, bytes]:
    (out / "stanford" / "mine").mkdir(parents=True)
    (out / "stanford" / "dataset.hdf5").write_bytes(b"my real scans")
    (out / "stanford" / "mine" / "notes.txt").write_text("do not lose")
    return _tree(out)


def test_cli_refuses_foreign_folder_one_line_exit_2_nothing_touched(tmp_path, capsys):
    out = tmp_path / "data"
    before = _users_folder(out)
    with pytest.raises(SystemExit) as e:
        _synth(out)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("error: ") and "--overwrite" in err and "stanford" in err
    assert _tree(out) == before  # user files intact, and no paired/ written either
    assert sorted(p.name for p in out.iterdir()) == ["stanford"]


def test_paired_foreign_refused_before_stanford_is_written(tmp_path, capsys):
    out = tmp_path / "data"
    _synth(out)
    stanford = _tree(out / "stanford")
    (out / "paired" / synth.MARKER).unlink()
    (out / "paired" / "extra.txt").write_text("mine")
    with pytest.raises(SystemExit):
        _synth(out, "--seed", "5")
    assert "paired" in capsys.readouterr().err
    assert _tree(out / "stanford") == stanford  # the check of both comes before either write
    assert (out / "paired" / "extra.txt").read_text() == "mine"


def test_overwrite_replaces_foreign_folder(tmp_path):
    out = tmp_path / "data"
    _users_folder(out)
    _synth(out, "--overwrite")
    names = {p.name for p in (out / "stanford").iterdir()}
    assert names == {"dataset.hdf5", "metadata.csv", "truth.csv", synth.MARKER}
    assert not list(out.glob(".*"))  # no temporaries left next to the folders


def test_rerun_replaces_own_output_and_marker_records_args(tmp_path):
    out = tmp_path / "data"
    _synth(out, "--seed", "1")
    first = (out / "stanford" / "metadata.csv").read_bytes()
    _synth(out, "--seed", "2")  # no --overwrite needed: the marker says it is synth's own
    assert (out / "stanford" / "metadata.csv").read_bytes() != first
    assert '"seed": 2' in (out / "stanford" / synth.MARKER).read_text()
    assert '"layout": "paired"' in (out / "paired" / synth.MARKER).read_text()
    # An empty folder (e.g. made by mkdir -p) is not the user's data either.
    (tmp_path / "empty" / "stanford").mkdir(parents=True)
    _synth(tmp_path / "empty")
    assert (tmp_path / "empty" / "stanford" / "dataset.hdf5").is_file()


def test_output_of_older_synth_without_marker_is_recognised(tmp_path):
    out = tmp_path / "data"
    _synth(out)
    for layout in ("stanford", "paired"):
        (out / layout / synth.MARKER).unlink()  # what synth wrote before the marker existed
    synth.check_target(out / "stanford", "stanford")
    synth.check_target(out / "paired", "paired")
    # the paired truth.csv header of those versions (before the focus / defect / concordance columns)
    truth = out / "paired" / "truth.csv"
    lines = truth.read_text().splitlines(keepends=True)
    truth.write_text("case_id,risk,tirads_risk,hidden_risk,heterogeneity,shape_change,pattern,ttp,washout,label\n"
                     + "".join(lines[1:]))  # fmt: skip
    synth.check_target(out / "paired", "paired")
    (out / "stanford" / "truth.csv").write_text("annot_id,something_else\n")  # same names, not synth's file
    with pytest.raises(DataError, match="not written by `usnodule synth`"):
        synth.check_target(out / "stanford", "stanford")


def test_file_or_symlink_target_refused_even_with_overwrite(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "stanford").write_text("a file")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "stanford").symlink_to(tmp_path / "a")
    for root in ("a", "b"):
        with pytest.raises(DataError, match="not a folder"):
            synth.check_target(tmp_path / root / "stanford", "stanford", overwrite=True)


# ---------------------------------------------------------------------------------------------- atomic swap
def _write_dir(target: Path, content: str) -> None:
    with atomic.atomic_path(target) as tmp:
        tmp.mkdir()
        for i in range(3):
            (tmp / f"f{i}.txt").write_text(f"{content} {i}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "g.txt").write_text(content)


def _content(target: Path) -> str | None:
    """'old' or 'new' when ``target`` holds that complete set, None when missing; fails on a mixed one."""
    if not target.exists():
        return None
    tree = _tree(target)
    (word,) = {v.decode().split()[0] for v in tree.values()}
    assert len(tree) == 4, f"incomplete set: {sorted(tree)}"
    return word


def test_swap_leaves_old_or_new_when_a_step_raises(tmp_path, monkeypatch):
    target = tmp_path / "stanford"
    _write_dir(target, "old")
    real_replace = os.replace

    def failing_replace(src, dst):  # the rename of the new set into place fails
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic.os, "replace", failing_replace)
    with pytest.raises(KeyboardInterrupt):
        _write_dir(target, "new")
    assert _content(target) == "old"  # put back
    assert [p.name for p in tmp_path.iterdir()] == ["stanford"]

    monkeypatch.setattr(atomic.os, "replace", real_replace)
    real_remove = atomic._remove

    def interrupted_remove(p):  # the delete of the old set, after the swap, is interrupted
        if ".old-" in p.name:
            raise KeyboardInterrupt
        real_remove(p)

    monkeypatch.setattr(atomic, "_remove", interrupted_remove)
    with pytest.raises(KeyboardInterrupt):
        _write_dir(target, "new")
    assert _content(target) == "new"
    monkeypatch.undo()
    _write_dir(target, "newer")  # the next write clears the aside copy the interrupted one left
    assert _content(target) == "newer"
    assert [p.name for p in tmp_path.iterdir()] == ["stanford"]


KILLER = """
import os, signal, sys
from pathlib import Path
from datamodules import atomic

target, step = Path(sys.argv[1]), sys.argv[2]
real = {"rename": os.rename, "replace": os.replace}

def kill_at(name):
    def hook(*a, **k):
        if name == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real[name](*a, **k)
    return hook

os.rename, os.replace = kill_at("rename"), kill_at("replace")  # before the aside / the into-place rename
atomic._remove = (lambda f: lambda p: os.kill(os.getpid(), signal.SIGKILL) if ".old-" in p.name else f(p))(
    atomic._remove) if step == "delete" else atomic._remove
with atomic.atomic_path(target) as tmp:
    tmp.mkdir()
    for i in range(3):
        (tmp / f"f{i}.txt").write_text(f"new {i}")
    (tmp / "sub").mkdir()
    (tmp / "sub" / "g.txt").write_text("new")
"""


@pytest.mark.parametrize("step, expect", [("rename", "old"), ("replace", None), ("delete", "new")])
def test_real_kill_between_swap_steps_never_loses_both(tmp_path, step, expect):
    target = tmp_path / "stanford"
    _write_dir(target, "old")
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(KILLER), str(target), step], cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True)  # fmt: skip
    assert run.returncode == -9, run.stderr
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name != "stanford")
    assert leftovers and all(".stanford.partial-" in n or ".stanford.old-" in n for n in leftovers)
    assert _content(target) == expect
    if expect is None:  # killed between the renames: the complete old set waits under its aside name
        (aside,) = (tmp_path / n for n in leftovers if ".old-" in n)
        assert _content(aside) == "old"
    # The next write (in this process: another PID) first puts back / clears what the killed one left.
    restored = atomic.clean_stale(target)
    assert {p.name for p in restored} == set(leftovers)
    assert _content(target) == (expect or "old")
    assert [p.name for p in tmp_path.iterdir()] == ["stanford"]
    _write_dir(target, "newer")
    assert _content(target) == "newer" and [p.name for p in tmp_path.iterdir()] == ["stanford"]


def test_stale_temporaries_of_dead_runs_removed_live_ones_kept(tmp_path):
    target = tmp_path / "out.h5"
    target.write_text("previous")
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    stale = [tmp_path / f".out.h5.partial-{dead_pid}.h5", tmp_path / f".out.h5.old-{dead_pid}.h5"]
    stale[0].write_text("half")
    stale[1].mkdir()
    (stale[1] / "x").write_text("x")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        busy = tmp_path / f".out.h5.partial-{live.pid}.h5"  # a concurrent writer still at work
        busy.write_text("writing")
        unrelated = tmp_path / ".other.h5.partial-1.h5"
        unrelated.write_text("not ours")
        with atomic.atomic_path(target) as tmp:
            tmp.write_text("done")
        assert target.read_text() == "done"
        assert not any(p.exists() for p in stale)
        assert busy.exists() and unrelated.exists()
    finally:
        live.kill()
        live.wait()
