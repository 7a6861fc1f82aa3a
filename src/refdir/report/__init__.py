"""Reports: documents made of blocks (:mod:`~refdir.report.blocks`) written as HTML and markdown
(:mod:`~refdir.report.render`); the figures (:mod:`~refdir.report.figures`); the report of one
run (:mod:`~refdir.report.run_report`, reading :mod:`~refdir.report.run_data`, with the suffix
section of :mod:`~refdir.report.suffix_section`); several runs side by side
(:mod:`~refdir.report.compare`)."""
