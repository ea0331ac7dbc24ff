"""Entry point of the ``slurm`` backend plugin."""

from __future__ import annotations

import click

from dschat_core.hookspecs import hookimpl

from .backend import SlurmBackend


@hookimpl
def register_backends(register) -> None:
    register(SlurmBackend())


@hookimpl
def register_commands(cli: click.Group) -> None:
    @cli.group("slurm")
    def slurm_group() -> None:
        """Slurm backend helpers."""

    @slurm_group.command("samples")
    @click.option("-o", "--output", default="samples/slurm", show_default=True, help="Folder to write to.")
    def samples(output: str) -> None:
        """Render the sbatch scripts of the three stages for one GPU, one node and two nodes.

        \b
        Example:
          dschat-core slurm samples -o samples/slurm
        """
        from .samples import write_samples

        for path in write_samples(output):
            click.echo(f"wrote {path}")
