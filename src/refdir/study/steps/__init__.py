"""The steps of ``refdir run``, one module each, every one a function of the run
(:class:`~refdir.study.state.Run`) that reads the files of the steps before it and writes its
own; :mod:`refdir.study.plan` lists them with the options each reads."""
