"""The model: loading it (:mod:`~refdir.model.loading`, options in
:mod:`~refdir.model.options`), its chat format (:mod:`~refdir.model.chat`), where it writes
into its residual stream (:mod:`~refdir.model.layout`, checked on the model by
:mod:`~refdir.model.layout_check`), scoped hooks (:mod:`~refdir.model.hooks`), and the passes
every later stage makes: greedy generation and last-position logits
(:mod:`~refdir.model.generation`, with the shared prompt prefix of :mod:`~refdir.model.prefix`)
and passes that start at a layer (:mod:`~refdir.model.layer_inputs`)."""
