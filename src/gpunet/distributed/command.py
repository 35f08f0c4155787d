"""What `gpunet train` does differently on several ranks: rank 0 alone prints, makes and locks the run
folder (the others learn its path from rank 0 and write nothing); see gpunet.cli."""
from __future__ import annotations

import os
import sys


class FolderOfRankZero:
    """The run folder as a rank other than 0 sees it: the path rank 0 made and locked; nothing to do."""

    fresh = False

    def __init__(self, path):
        self.path = path

    def start(self, say=print) -> None:
        pass

    def close(self) -> None:
        pass


def run_folder(world, prepare):
    """prepare() on rank 0 (the folder made, locked and checked); on the other ranks a FolderOfRankZero
    with rank 0's path."""
    folder = prepare() if world.rank == 0 else None
    if world.world_size == 1:
        return folder
    path = world.broadcast_object(folder.path if folder is not None else None)
    return folder if folder is not None else FolderOfRankZero(path)


def quiet_other_ranks(world) -> None:
    """Send the standard output of ranks other than 0 to nowhere (their errors still reach stderr)."""
    if world.rank != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of this process
