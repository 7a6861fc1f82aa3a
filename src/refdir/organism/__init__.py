"""The bundled model organism, a small safety-tuned SmolLM2 that really refuses: loading it
(:mod:`~refdir.organism.load`, which :func:`refdir.load_model` calls for ``"organism"``) lives
apart from building it (:mod:`~refdir.organism.build`, from :mod:`~refdir.organism.recipe`),
since building needs the model stage's generation and loading sits below it."""
