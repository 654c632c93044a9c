"""(being written) hijax."""

__all__: list[str] = []
