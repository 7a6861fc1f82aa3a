"""The ``refdir`` command line (:mod:`~refdir.cli.commands`), its options built from the config
models (:mod:`~refdir.cli.options`), the work of each command (:mod:`~refdir.cli.work`) and
the process's memory setting (:mod:`~refdir.cli.allocator`)."""

from refdir.cli.commands import app, entry

__all__ = ["app", "entry"]
