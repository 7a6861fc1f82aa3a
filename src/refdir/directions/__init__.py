"""Directions: the :class:`~refdir.directions.direction.Direction` value and the
:class:`~refdir.directions.candidates.Candidates` it is chosen from; their extraction by
difference of means (:mod:`~refdir.directions.extraction`, with the paper's prompt filter of
:mod:`~refdir.directions.prompt_filter` and the refusal tokens of
:mod:`~refdir.directions.refusal_tokens`); the paper's scores
(:mod:`~refdir.directions.scoring`) and its filters and pick
(:mod:`~refdir.directions.selection`)."""
