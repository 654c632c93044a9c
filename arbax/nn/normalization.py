"""(being written) normalization."""

__all__: list[str] = []
