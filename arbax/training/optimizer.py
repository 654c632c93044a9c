"""(being written) optimizer."""

__all__: list[str] = []
