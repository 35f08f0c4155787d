"""A run's setup, decided once: the device, the distributed world, the run folder with its lock,
resume or overwrite, the seed and whether a resume may go on with changed data.

`gpunet train` builds it (for_command) before any data is loaded and hands it to gn.fit(setup=...);
gn.fit called from Python builds its own (for_fit) from its arguments. Either way the settings are
checked in one place (check), the world is made once, the folder is opened and locked once and
errors are ended together across ranks once: by the command line's main, or by fit around a run
it set up itself (session).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from gpunet import distributed
from gpunet.training import runs
from gpunet.backend import Device
from gpunet.distributed import Replicas, command
from gpunet.errors import UsageError


@dataclass(frozen=True)
class RunSetup:
    """Where and how one run trains; by: "cli" or "fit", who built it (and how errors name the settings)."""

    device: Device
    world: Replicas  # this process's share of a data-parallel run
    out: Path | None  # the run folder (rank 0 writes it, every rank reads it to resume)
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    allow_data_change: bool = False
    by: str = "fit"
    folder: object = None  # the locked runs.RunFolder when built by the command line (it closes it)

    @property
    def on_gpu(self) -> bool:
        return self.device.name == "gpu"

    @property
    def writes(self) -> bool:
        """Whether this process writes the run folder and logs (rank 0)."""
        return self.world.writes

    @classmethod
    def for_fit(cls, device: str, out_dir=None, *, resume: bool = False, overwrite: bool = False, seed: int = 0,
                allow_data_change: bool = False) -> RunSetup:
        """gn.fit's own setup, from its arguments (the folder is opened by session)."""
        check(resume, overwrite, allow_data_change, out_dir is not None, "fit")
        world = distributed.replicas(device)  # world size 1 without a launcher (mpiexec, srun, torchrun)
        return cls(Device(device), world, Path(out_dir) if out_dir is not None else None, resume, overwrite, seed,
                   allow_data_change, "fit")

    @classmethod
    def for_command(cls, pick_device, out, model: str, *, resume: bool, overwrite: bool, seed: int,
                    allow_data_change: bool) -> RunSetup:
        """`gpunet train`'s setup: checked (before pick_device() resolves the device, which may warn), the world
        made, and the folder made, locked and checked (by rank 0, before any data is loaded); close() releases it."""
        check(resume, overwrite, allow_data_change, True, "cli")
        device = pick_device()
        world = distributed.init(device.name)  # world size 1 unless started by mpiexec, srun or torchrun
        command.quiet_other_ranks(world)
        folder = command.run_folder(world, lambda: runs.prepare(out, model, resume, overwrite))
        return cls(device, distributed.replicas(device.name), Path(folder.path), resume, overwrite, seed,
                   allow_data_change, "cli", folder)

    @contextlib.contextmanager
    def session(self, log=print):
        """Around fit's training. A setup fit built: its folder opened (created, locked, a dead run's
        temporaries removed, checked as `gpunet train` checks --out) and errors ended together across
        ranks; one the command line built holds both already."""
        if self.by == "cli":
            yield
            return
        names = runs.option_names("fit")
        opened = (runs.open_run(self.out, self.resume, self.overwrite, log, names)
                  if self.out is not None and self.writes else contextlib.nullcontext())
        with opened, distributed.ends_together():
            yield

    def close(self) -> None:
        if self.folder is not None:
            self.folder.close()


def check(resume: bool, overwrite: bool, allow_data_change: bool, has_out: bool, by: str) -> None:
    """The one check of the run's settings, for the command line and gn.fit alike (by names them)."""
    n = runs.option_names(by)
    error = UsageError if by == "cli" else ValueError  # a wrong command line exits with status 2
    if resume and overwrite:
        raise error(f"{n['where']}{n['resume']} continues the run in {n['folder']} and {n['overwrite']} moves it "
                    "aside; give one of them")
    if resume and not has_out:
        raise error(f"{n['where']}{n['resume']} needs {n['out']}, the folder of the run to continue")
    if allow_data_change and not resume:
        raise error(f"{n['where']}{n['allow_data_change']} lets {n['a_resume']} go on with changed data; it goes "
                    f"with {n['resume']}")
