"""(being written) iteration."""

__all__: list[str] = []
