"""Adversarial suffixes: a universal suffix found by GCG (:mod:`~refdir.suffix.search`), what it
does to the refusal direction and the attention heads that write it
(:mod:`~refdir.suffix.analysis`, :mod:`~refdir.suffix.figures`), and the two together
(:mod:`~refdir.suffix.experiment`)."""
