"""(being written) metrics."""

__all__: list[str] = []
