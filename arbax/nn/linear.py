"""(being written) linear."""

__all__: list[str] = []
