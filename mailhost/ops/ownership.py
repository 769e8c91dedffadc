"""One owner for state (DESIGN.md): what root creates belongs to the daemon's user.

The daemon runs as its own user (twistd --uid), the owner of state_dir. The CLI is run as
root (sendmail from cron, `user add`), and so is the daemon until it drops privileges (the
lock, the control socket, the generated TLS pair). Whatever they create as root, the daemon
must read and write afterwards: a pickup file, a users file or Maildir only root can read is
mail lost or refused. So every writer that may run as root creates its files and folders
through an `Owner`, the owner of state_dir, and gives each to it before it is used (a file
before it is renamed into place, so it never appears with the wrong owner).

Only root can give a file away, and only root needs to: for anyone else `owner_of` is None,
and every function here takes None and then does what it would have done anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Owner:
    uid: int
    gid: int

    def give(self, path: str | Path) -> None:
        """Make `path` (a file, folder or socket; a symlink itself, not what it points to) this owner's."""
        os.chown(path, self.uid, self.gid, follow_symlinks=False)

    def give_fd(self, fd: int) -> None:
        os.fchown(fd, self.uid, self.gid)


def owner_of(state_dir: Path) -> Owner | None:
    """The owner of `state_dir` when we run as root and it is someone else; otherwise None
    (what we create is then ours, as it should be: we are the daemon's user, or it is root)."""
    if os.geteuid() != 0:
        return None
    try:
        st = os.stat(state_dir)
    except OSError:
        return None  # not made yet: there is no daemon's user to give anything to
    if st.st_uid == 0 and st.st_gid == 0:
        return None
    return Owner(st.st_uid, st.st_gid)


def give(path: str | Path, owner: Owner | None) -> None:
    """`owner.give(path)`, for an owner that may be None."""
    if owner is not None:
        owner.give(path)


def make_dirs(path: Path, mode: int = 0o700, owner: Owner | None = None) -> list[Path]:
    """`path.mkdir(mode, parents=True, exist_ok=True)`, each folder it creates given to `owner`;
    returns the folders it created, outermost first (for a caller that must take them back)."""
    missing = []
    folder = path
    while not folder.is_dir():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir(mode=mode)
        except FileExistsError:
            if not folder.is_dir():
                raise
            continue  # made meanwhile by someone else: theirs, not ours to give
        created.append(folder)
        give(folder, owner)
    return created
