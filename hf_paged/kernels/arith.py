"""Host-side integer helpers of the launch math (and of the block tables' sizes)."""


def cdiv(a, b):
    """Ceiling division of host ints or numpy arrays (triton.cdiv costs microseconds per call)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()
