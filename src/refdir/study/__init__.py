"""The paper's study of one model as a resumable run: its options
(:mod:`~refdir.study.config`), the steps (:mod:`~refdir.study.steps`) and their table, from
which what to redo is computed (:mod:`~refdir.study.plan`), the run folder's state
(:mod:`~refdir.study.state`, :mod:`~refdir.study.files`) and the loop
(:mod:`~refdir.study.run`)."""
