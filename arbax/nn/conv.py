"""(being written) conv."""

__all__: list[str] = []
