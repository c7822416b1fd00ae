"""ReGATE runtime: scoring, the dual-cycle schedule, selection and the teacher cache."""

__all__: list[str] = []
