"""The typed files refdir writes: one pydantic model per file, which the writers write through
and every reader (the report, ``refdir compare``, resuming a run) reads through. Free of torch.
Their JSON Schemas are published in ``docs/schemas/``."""
