"""(being written) control."""

__all__: list[str] = []
