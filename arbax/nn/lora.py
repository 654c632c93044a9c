"""(being written) lora."""

__all__: list[str] = []
