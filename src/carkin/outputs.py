"""Output files written as a set, completely or not at all.

Every output is first written to a hidden temporary name in its final folder
(``.NAME.carkin-part-PID.EXT``, the same extension so writers that infer the format from
it still work). Only when every file of a command's set is complete are they renamed into
place. The renames are recorded first in a small journal (``.carkin-commit-HOST~PID.json``), so a
run killed among them is rolled forward, from complete files, by the next carkin run on that
host that writes to that folder (or by :func:`recover`). Temporary files and journals carry
their host and process, so runs on several hosts sharing a folder never clean up each
other's work in progress. A failed or interrupted run therefore never
leaves a partial file at a final path and never destroys an earlier output.

Policy: an existing output is replaced only when the caller says so (``overwrite=True``,
the CLI's ``--overwrite``); otherwise the run is refused before any work, naming the files.
A symbolic link at an output path is replaced as a link, never written through.
Files that an earlier run of the same command wrote into a folder and this run does not
write (plots of an earlier fit, say) are listed in the folder's manifest
(``.carkin-outputs.json``) and removed with the commit, so one folder never mixes runs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import uuid
from contextlib import contextmanager
from pathlib import Path

from carkin.errors import InputError

JOURNAL_PREFIX = ".carkin-commit-"
MANIFEST = ".carkin-outputs.json"
PART = ".carkin-part-"
HOST = "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def owner() -> str:
    """This process, as temporary names and journals carry it: HOST~PID."""
    return f"{HOST}~{os.getpid()}"


def journals(folder) -> list[Path]:
    """The commit journals present in ``folder`` (one per committing process)."""
    return sorted(p for p in Path(folder).glob(f"{JOURNAL_PREFIX}*.json") if PART not in p.name)


def temp_beside(final: Path) -> Path:
    """A hidden temporary name in ``final``'s folder, tagged with this process, same extension
    (writers that infer the format from it still work)."""
    return final.with_name(f".{final.stem.lstrip('.')}{PART}{owner()}-{uuid.uuid4().hex[:8]}{final.suffix}")


def _dead_here(tag: str) -> bool:
    """True for a HOST~PID of this host whose process has ended (another host's runs are left alone)."""
    host, _, pid = tag.partition("~")
    if host != HOST or not pid.isdigit():
        return False
    return not _pid_alive(int(pid))


class OutputError(InputError):
    """An output location that cannot be used, with the fix."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(folder) -> list[str]:
    """Finish a commit that was interrupted in ``folder`` and remove temporary files of dead runs.

    Returns the final paths the roll-forward completed (empty when there was nothing to do)."""
    folder = Path(folder)
    done = []
    for journal in journals(folder):
        if not _dead_here(journal.name[len(JOURNAL_PREFIX):-len(".json")]):
            continue  # a commit in progress, or another host's
        try:
            plan = json.loads(journal.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            plan = None  # the journal itself was being written: no rename had started
        if plan is not None:
            for temp, final in plan["renames"]:
                if Path(temp).exists() or Path(temp).is_symlink():
                    os.replace(temp, final)
                    done.append(final)
            for stale in plan.get("remove", []):
                if os.path.lexists(stale):
                    os.remove(stale)
            if plan.get("manifest") is not None:
                _write_json(folder / MANIFEST, {"files": plan["manifest"]})
        journal.unlink(missing_ok=True)
    for part in folder.glob(f".*{PART}*"):
        if _dead_here(part.name.split(PART, 1)[1].split("-", 1)[0]):
            part.unlink(missing_ok=True)
    return done


def _write_json(path: Path, obj) -> None:
    """A small JSON file written atomically (temporary name, fsync, rename)."""
    temp = temp_beside(path)
    with open(temp, "w", encoding="utf-8") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)


@contextmanager
def _signals_held():
    """Defer SIGINT and SIGTERM while the renames run, so Ctrl-C cannot stop a commit half-way.

    Python runs signal handlers in the main thread whichever thread the signal reached (JAX keeps
    native threads), so the handlers are swapped rather than the signal mask changed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in received:  # delivered now, with the handlers the program had
            os.kill(os.getpid(), s)


class Outputs:
    """A command's output files: checked before any work, written to temporary names, committed together.

    >>> outputs = Outputs(["out/run.nc", "out/run.png"], overwrite=False)   # refuses early
    >>> ...compute...
    >>> with outputs:                         # commits on success, discards on any error
    ...     ds.to_netcdf(outputs.temp("out/run.nc"))
    """

    def __init__(self, paths, *, overwrite: bool = False, what: str = "output", manifest: bool | str = False):
        """``manifest``: True for a command that owns its folder (its set replaces the earlier run's,
        whose other files are removed); "add" for one that adds files to such a folder (carkin vpc)."""
        self.finals = [Path(os.path.abspath(p)) for p in paths]
        folders = {p.parent for p in self.finals}
        if len(folders) != 1:
            raise OutputError(f"the outputs of one command must share a folder, got {sorted(map(str, folders))}")
        self.folder = folders.pop()
        self.overwrite = overwrite
        self.manifest = manifest
        self._temps: dict[Path, Path] = {}
        self._check(what)

    def _check(self, what: str) -> None:
        # The folder itself is only created when the first file is written, so a run refused later
        # leaves nothing behind; here its nearest existing ancestor must be a folder we can write to.
        ancestor = self.folder
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
        if not ancestor.is_dir():
            raise OutputError(f"cannot write {what} under {ancestor}: it is a file, not a folder; give another path")
        if ancestor == self.folder:
            probe = temp_beside(self.folder / "probe")
            try:
                probe.write_bytes(b"")
                probe.unlink()
            except OSError as e:
                raise OutputError(f"cannot write to {self.folder} ({e.strerror}); give a folder you can write to "
                                  "(checked before any work starts)") from None
            recover(self.folder)
        elif not os.access(ancestor, os.W_OK | os.X_OK):
            raise OutputError(f"cannot create {self.folder}: {ancestor} is not writable; give a folder you can "
                              "write to (checked before any work starts)")
        for p in self.finals:
            if p.is_dir() and not p.is_symlink():
                raise OutputError(f"{p} is a folder; give a file name for the {what}")
        existing = [p for p in self.finals if os.path.lexists(p)]
        if self.manifest is True:
            existing += [p for p in self._previous_run() if p not in self.finals and os.path.lexists(p)]
        if existing and not self.overwrite:
            shown = ", ".join(str(p) for p in existing[:6]) + (f" and {len(existing) - 6} more" if len(existing) > 6
                                                               else "")
            raise OutputError(f"{len(existing)} output file(s) exist: {shown}; pass --overwrite (overwrite=True) to "
                              "replace them, or choose another output name")

    def _previous_run(self) -> list[Path]:
        """Files the manifest says an earlier run of a folder-owning command wrote here."""
        if not self.manifest or not (self.folder / MANIFEST).is_file():
            return []
        try:
            names = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return []
        return [self.folder / str(n) for n in names if "/" not in str(n) and str(n) not in ("", ".", "..")]

    def temp(self, final) -> Path:
        """The temporary path to write ``final`` to (same folder, same extension)."""
        final = Path(os.path.abspath(final))
        if final not in self.finals:
            self.finals.append(final)
            if final.parent != self.folder:
                raise OutputError(f"{final} is outside the output folder {self.folder}")
            if os.path.lexists(final) and not self.overwrite:
                raise OutputError(f"output file {final} exists; pass --overwrite to replace it")
        if final not in self._temps:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._temps[final] = temp_beside(final)
        return self._temps[final]

    def commit(self) -> list[str]:
        """Rename every written file into place (journalled) and drop an earlier run's leftovers."""
        missing = [str(f) for f, t in self._temps.items() if not t.exists()]
        if missing:
            self.discard()
            raise OutputError(f"internal: output(s) {missing} were not written; nothing was replaced")
        for t in self._temps.values():  # data on disk before the names change
            with open(t, "rb") as f:
                os.fsync(f.fileno())
        renames = [[str(t), str(f)] for f, t in self._temps.items()]
        previous = self._previous_run()
        remove = [str(p) for p in previous if p not in self._temps and os.path.lexists(p)] if self.manifest is True \
            else []
        kept = [p.name for p in previous if p not in self._temps] if self.manifest == "add" else []
        manifest = kept + [Path(f).name for _, f in renames] if self.manifest else None
        with _signals_held():
            journal = self.folder / f"{JOURNAL_PREFIX}{owner()}.json"
            _write_json(journal, {"renames": renames, "remove": remove, "manifest": manifest})
            for temp, final in renames:
                os.replace(temp, final)
            for stale in remove:
                os.remove(stale)
            if manifest is not None:
                _write_json(self.folder / MANIFEST, {"files": manifest})
            journal.unlink()
        self._temps = {}
        return [f for _, f in renames]

    def discard(self) -> None:
        for t in self._temps.values():
            t.unlink(missing_ok=True)
        self._temps = {}

    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        if kind is None:
            self.commit()
        else:
            self.discard()
        return False


def write_netcdf(ds, path, *, overwrite: bool = False) -> str:
    """Write a Dataset or DataTree to ``path`` (netCDF4 via h5netcdf) atomically."""
    with Outputs([path], overwrite=overwrite, what="netCDF file") as out:
        ds.to_netcdf(out.temp(path), engine="h5netcdf")
    return str(path)


def save_figure(fig, path, dpi: int) -> str:
    """``fig.savefig`` to a temporary name beside ``path``, renamed into place when complete (a plot
    function's explicit ``path=`` is the caller's consent to replace that file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_beside(path)
    try:
        fig.savefig(temp, dpi=dpi)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return str(path)
