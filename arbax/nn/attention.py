"""(being written) attention."""

__all__: list[str] = []
