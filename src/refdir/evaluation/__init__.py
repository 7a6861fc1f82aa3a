"""Evaluation of an intervention: the refusal score by markers (:mod:`~refdir.evaluation.refusal`),
safety judges (:mod:`~refdir.evaluation.judges`), the KL score (:mod:`~refdir.evaluation.kl`),
cross-entropy on text and on completions (:mod:`~refdir.evaluation.losses`) and
lm-evaluation-harness benchmarks on the hooked model (:mod:`~refdir.evaluation.benchmarks`)."""
